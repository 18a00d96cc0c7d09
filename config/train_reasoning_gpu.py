# The three-cups task on one GPU: a wider model, larger batches and more steps than the CPU config.
# python prepare_data.py reasoning && python train.py config/train_reasoning_gpu.py
# Same data and the same evaluation (python eval.py: accuracy by difficulty and r = 1 ... 64) as
# config/train_reasoning_cpu.py.
out_dir = "out-reasoning-gpu"
dataset = "reasoning"
eval_interval = 1000
eval_iters = 20
log_interval = 100

batch_size = 256
block_size = 33  # = row_len of the data
gradient_accumulation_steps = 1

# all blocks inside the loop, as in the CPU config (see there why); twice as wide
n_embd = 128
n_head = 4
n_layers_prelude = 0
n_layers_core = 1
n_layers_coda = 0
intermediate_size = 256
mean_recurrence = 8
backprop_depth = 4

learning_rate = 2e-3
max_iters = 5000
warmup_iters = 200
min_lr = 2e-4
weight_decay = 0.05
beta2 = 0.98

dtype = "float32"  # a 0.2M-parameter model gains nothing from bf16, and exact state tracking over 64 steps likes fp32
compile = False    # launch-bound at this size either way
