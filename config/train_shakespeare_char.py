# Tiny shakespeare, characters, on a CPU in 4-6.5 minutes, built to show what the recurrence buys: every block
# is inside the loop, so r = 1 is a one-block model and r = r_bar a four-block one (val loss by r: docs/training.md).
#   python prepare_data.py shakespeare_char && python train.py config/train_shakespeare_char.py
# (With one prelude and one coda block around the core, the same budget gave a gap of only ~0.03 nats between
# r = 1 and r_bar: the fixed blocks did most of the work.)
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
eval_r = [1, 2, 4, 8, 16]  # r = 1 ... 4 r_bar
log_interval = 50

batch_size = 12
block_size = 64
gradient_accumulation_steps = 1

# no prelude, no coda: one 128-wide block looped r times (r_bar = 4: training r averages 5), gradients through
# the last k = 2 steps
n_embd = 128
n_head = 4
n_layers_prelude = 0
n_layers_core = 1
n_layers_coda = 0
intermediate_size = 384
mean_recurrence = 4
backprop_depth = 2

learning_rate = 2e-3
max_iters = 3000
warmup_iters = 100
lr_decay_iters = 3000
min_lr = 2e-4
weight_decay = 0.1

device = "cpu"
compile = False
num_threads = 1     # steady: with another program on one of 2 cores, 2 threads ran 2.8x slower than 1 (on an idle
                    # machine 1.4x faster); the README's figures were made with 1 (threads change the rounding)
vocab_multiple = 1  # no padding: nothing to gain on a CPU, and the README's figures stay reproducible
