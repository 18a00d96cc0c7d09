# A character-level model of tiny shakespeare that trains on a laptop CPU in a few minutes.
# python prepare_data.py shakespeare_char && python train.py config/train_shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 10
log_interval = 25

batch_size = 32
block_size = 128
gradient_accumulation_steps = 1

# 1 prelude + 2 core + 1 coda blocks, 128 wide; the core is looped r_bar = 8 times on average
n_embd = 128
n_head = 4
n_layers_prelude = 1
n_layers_core = 2
n_layers_coda = 1
intermediate_size = 384
mean_recurrence = 8
backprop_depth = 4

learning_rate = 2e-3  # a small model can take a large step
max_iters = 1500
warmup_iters = 100
lr_decay_iters = 1500
min_lr = 2e-4
weight_decay = 0.1

device = "cpu"
compile = False  # compiling on CPU takes about as long as this whole run saves
