# A quick first GPU run (a smoke test, minutes): the ~96M model of train.py's defaults on tiny shakespeare with GPT-2's
# BPE instead of FineWeb-Edu. python prepare_data.py shakespeare && python train.py config/train_shakespeare_gpu.py
# 300k training tokens are few for 96M parameters: val loss bottoms out within a few hundred iterations and then
# rises as the model memorises, so only improvements are saved (the best checkpoint survives).
out_dir = "out-shakespeare-gpu"
dataset = "shakespeare"
eval_interval = 100
eval_iters = 5  # the val split is 36k tokens: 5 batches of 16 x 512 cover it about once
log_interval = 10
always_save_checkpoint = False

batch_size = 16
block_size = 512
gradient_accumulation_steps = 1

# the model: train.py's defaults, spelled out
n_embd = 768
n_head = 12
n_layers_prelude = 2
n_layers_core = 4
n_layers_coda = 2
intermediate_size = 2048
mean_recurrence = 8
backprop_depth = 4

learning_rate = 6e-4
max_iters = 2000
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 6e-5
weight_decay = 0.1
