# Fine-tune the released Huginn-0125 on GSM8K (python prepare_data.py gsm8k first): LoRA on the core and the adapter,
# the base frozen in bf16, for a 24 GB card; --lora_rank=0 trains every weight (an 80 GB card), --fsdp under
# torchrun shards them over several. The objective is the release's own: r around r_bar = 32, backprop through k = 8.
init_from = "huginn-0125"
out_dir = "out-gsm8k"
dataset = "gsm8k"
block_size = 512              # = the data's row_len: prepare_data.py gsm8k --row_len=512 (pairs longer are skipped)
batch_size = 1
gradient_accumulation_steps = 16
mean_recurrence = 32          # r_bar
backprop_depth = 8            # k
lora_rank = 16
lora_alpha = 32.0
lora_modules = "core,adapter"
activation_checkpointing = True
learning_rate = 1e-4          # full fine-tuning wants far less: the reference's GSM8K example used 5e-7
min_lr = 1e-5
weight_decay = 0.0
max_iters = 400               # ~ 1 epoch of GSM8K's 7,473 pairs at 16 a step
warmup_iters = 20
eval_interval = 100
eval_iters = 8
eval_r = [4, 16, 32]
compile = False               # the loop over r is Python; a 3.5B compile costs more than a short run saves
