# Test-time scaling you can watch on a laptop CPU: the three-cups state-tracking task (prepare_data.py reasoning).
# python prepare_data.py reasoning && python train.py config/train_reasoning_cpu.py
# Trains on problems of 1-8 moves at r_bar = 8; then python eval.py --out_dir=out-reasoning prints exact-match accuracy
# by difficulty (1-8, and 12, 16, 24, 32 moves: beyond training) and test-time r = 1 ... 64.
out_dir = "out-reasoning"
dataset = "reasoning"
eval_interval = 500
eval_iters = 10
log_interval = 50

batch_size = 32
block_size = 33  # = row_len of the data: whole rows, one or more problems each
gradient_accumulation_steps = 1

# No prelude and no coda: the whole network is one 64-wide block looped r times. With even one block before and
# after the loop, the model first learns to solve short problems in those fixed blocks and ignores the loop
# for a long time; with none, the only way to more compute is more steps of the core.
n_embd = 64
n_head = 4
n_layers_prelude = 0
n_layers_core = 1
n_layers_coda = 0
intermediate_size = 128
mean_recurrence = 8
backprop_depth = 4

learning_rate = 3e-3
max_iters = 6000  # 3,000 left seed 0 short on the longest problems (docs/training.md)
warmup_iters = 100
min_lr = 3e-4
weight_decay = 0.05
beta2 = 0.98

device = "cpu"
compile = False
num_threads = 1     # steady: with another program on one of 2 cores, 2 threads ran 2.8x slower than 1 (on an idle
                    # machine 1.4x faster); the README's figures were made with 1 (threads change the rounding)
vocab_multiple = 1  # no padding: nothing to gain on a CPU, and the README's figures stay reproducible
