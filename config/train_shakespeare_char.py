# A character-level recurrent model of tiny shakespeare that trains on a laptop CPU in a few minutes.
#   python prepare_data.py shakespeare_char && python train.py config/train_shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64
gradient_accumulation_steps = 1

# Two 128-wide blocks, both in the core, looped r_bar = 4 times on average with gradients through the last
# k = 2 iterations (0.47M parameters). No prelude and no coda: every extra block of depth has to come from
# another iteration, so the model learns to use its recurrence (r = 1 is clearly worse than r_bar). With one
# block before and one after the loop the same budget gave nearly the same r_bar loss but a gap of only 0.03.
n_embd = 128
n_head = 4
n_layers_prelude = 0
n_layers_core = 2
n_layers_coda = 0
intermediate_size = 384
mean_recurrence = 4
backprop_depth = 2

learning_rate = 2e-3  # a small model can take a large step
max_iters = 1500
warmup_iters = 100
lr_decay_iters = 1500
min_lr = 2e-4
weight_decay = 0.1

device = "cpu"
compile = False  # on a CPU, compiling takes longer than it saves in a run this short
