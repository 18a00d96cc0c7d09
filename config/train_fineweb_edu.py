# The one-GPU run: train.py's defaults, written out with the sums behind them.
#   python prepare_data.py fineweb_edu    # 36 shards: ~2.0B train tokens + 10M val, ~8 GB of disk, ~10 CPU-minutes
#   python train.py                       # = python train.py config/train_fineweb_edu.py
#   python eval.py --out_dir=out --r="[1,2,4,8,16,32,64]"   # val loss by test-time r on the val shard
#
# Model: the ~96M `small` preset, 2 prelude + 4 core + 2 coda blocks, 768 wide, r_bar 8, k 4.
# Tokens: 3,800 iterations x 524,288 tokens = 1.99B, as many as the 36 shards hold (blocks drawn at random, so not
# exactly each once): about Chinchilla's 20 tokens per parameter (the loop makes the model compute like a deeper
# one, so it could use more).
# Time on an H100-class GPU (989 TFLOP/s bf16 dense): training costs 1.64 GFLOP per token on average over the r
# sampler (model.estimate_flops_per_token at each r, weighted by how often sample_num_steps draws it: E[r] = 9,
# and r <= 30 in 99.6% of draws), so 3.26e18 FLOPs: 2.3 hours at 40% MFU, 3.1 hours at 30%. The evals add under 2%.
# The log prints MFU against the GPU's datasheet peak, so the first minutes tell which of these it is.
# None of this was run here: the project has had no GPU yet (docs/tests.md, "A first GPU run").
out_dir = "out"
dataset = "fineweb_edu"
eval_interval = 250
eval_iters = 20               # 20 x 32 x 1024 = 655k fixed val tokens, at r = 1, r_bar, 2 r_bar
log_interval = 10

batch_size = 32
block_size = 1024
gradient_accumulation_steps = 16  # 524,288 tokens per iteration, GPT-2's batch
vocab_multiple = 64           # 50257 -> 50304

n_embd = 768
n_head = 12
n_layers_prelude = 2
n_layers_core = 4
n_layers_coda = 2
intermediate_size = 2048
mean_recurrence = 8
backprop_depth = 4

learning_rate = 6e-4
max_iters = 3800
warmup_iters = 200
lr_schedule = "cosine"
min_lr = 6e-5
weight_decay = 0.1
grad_clip = 1.0

compile = True
