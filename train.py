"""
Train the recurrent-depth model. The defaults are the one-GPU run on FineWeb-Edu (config/train_fineweb_edu.py
spells them out, with the time it takes):

    python prepare_data.py fineweb_edu && python train.py
    python prepare_data.py reasoning && python train.py config/train_reasoning_cpu.py       # a CPU, minutes
    torchrun --standalone --nproc_per_node=8 train.py                                       # 8 GPUs (DDP)

Continue a run exactly where its last checkpoint left off:  python train.py <same config> --init_from=resume
Evaluate a checkpoint by r (val loss; accuracy by difficulty for reasoning data): python eval.py --out_dir=...

Every iteration draws a new r (paper section 3) and back-propagates through the last k steps of the core only;
the loop over r stays in Python and only its fixed-shape pieces are compiled, so a new r never recompiles.
"""

import importlib.util
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (load_released, lock_run_folder, read_checkpoint, released_config, released_layout,
                         save_checkpoint)
from common import (format_seconds, keyed_generator, peak_bf16_flops, pick_device, pick_dtype, restart_log,
                    set_threads, writable_dir)
from configurator import configure, fail, number, one_of, steps, whole
from dataloader import TokenData, default_folder, vocabulary_differs
from finetune import add_lora, describe, load_lora_state, lora_pattern, lora_state, memory_plan, peak_memory, shard
from model import RecurrentConfig, RecurrentGPT, sample_num_steps

# -----------------------------------------------------------------------------------------------------------
# settings (defaults: the ~96M model on FineWeb-Edu, one GPU); override with config/*.py and --key=value
# I/O
out_dir = "out"
init_from = "scratch"         # "scratch", "resume" (from out_dir/ckpt.pt), or "huginn-0125" or a folder in its
                              # layout: fine-tune the released model (its architecture; r_bar and k from below)
overwrite = False             # a scratch run into a folder that holds a checkpoint replaces it (else it stops)
eval_interval = 250           # evaluate (and save) every this many iterations, and at the end
eval_iters = 20               # batches in the fixed validation set
eval_r = []                   # val loss at these r; [] means 1, r_bar and 2 r_bar
log_interval = 10
always_save_checkpoint = True  # else save only when val loss at r_bar improves
# data
dataset = "fineweb_edu"
data_dir = ""                 # "" means data/<dataset> next to this file
batch_size = 32               # sequences per micro-step (per process)
block_size = 1024             # tokens per sequence
gradient_accumulation_steps = 16  # micro-steps per iteration, summed over all processes
vocab_multiple = 64           # round the vocabulary up to a multiple of this (GPT-2's 50257 -> 50304), for speed
# model (the fields of RecurrentConfig; vocab_size comes from the data)
n_embd = 768
n_head = 12
n_layers_prelude = 2
n_layers_core = 4
n_layers_coda = 2
intermediate_size = 2048
mean_recurrence = 8           # r_bar
backprop_depth = 4            # k
sigma = 0.5                   # spread of the r sampler
rope_base = 50_000.0
norm_eps = 1e-6
qk_bias = True
tie_embeddings = True
init_scale = 1.0              # std of the noise start s_0, relative to the model's default
# optimizer: AdamW
learning_rate = 6e-4
max_iters = 3800
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 disables
# learning-rate schedule: linear warmup, then "cosine" (to min_lr at lr_decay_iters), "wsd" (warmup-stable-decay:
# constant, then linear to min_lr over the last cooldown_iters) or "constant"
lr_schedule = "cosine"
warmup_iters = 200
lr_decay_iters = 0            # 0 means max_iters
cooldown_iters = 1000
min_lr = 6e-5
# system
device = ""                   # "" picks cuda > mps > cpu; or "cpu", "cuda", "cuda:1", "mps"
dtype = ""                    # "" means bfloat16 autocast on GPUs that have bf16 units, float32 elsewhere
compile = True                # torch.compile the model's fixed-shape pieces
num_threads = 0               # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores
seed = 1337
# fine-tuning the released model (finetune.py)
lora_rank = 0                 # > 0: train LoRA adapters of this rank only (pip install peft); 0: every weight
lora_alpha = 16.0             # the adapters' scale is lora_alpha / lora_rank
lora_modules = "core,adapter"  # the Linear layers that get adapters: any of prelude, core, coda, adapter
activation_checkpointing = False  # recompute each step of the core in backward instead of keeping its activations
fsdp = False                  # under torchrun: shard weights, gradients and optimizer state (FSDP2), not DDP
# -----------------------------------------------------------------------------------------------------------
config = configure(globals())
# every setting checked before any data is read or a model built
whole(config, 1, "batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "eval_interval",
      "log_interval", "vocab_multiple", "max_iters")
whole(config, 0, "warmup_iters", "lr_decay_iters", "cooldown_iters", "seed", "lora_rank")
number(config, "learning_rate", above=0)
number(config, "min_lr", low=0, high=learning_rate)
number(config, "weight_decay", low=0)
number(config, "grad_clip", low=0)
number(config, "init_scale", low=0)
for beta in ("beta1", "beta2"):
    number(config, beta, low=0, below=1)
finetune = init_from not in ("scratch", "resume")  # from the release
if finetune and not (init_from in ("huginn-0125", "tomg-group-umd/huginn-0125")
                     or os.path.isdir(init_from) and released_layout(init_from)):
    fail(f"--init_from is scratch, resume, huginn-0125 or a folder in its layout (config.json and *.safetensors); "
         f"got {init_from!r}")
if os.path.isdir(out_dir) and released_layout(out_dir):  # a run writes its own config.json there
    fail(f"--out_dir={out_dir} holds a model in the released layout (config.json and *.safetensors): choose another "
         "--out_dir")
number(config, "lora_alpha", above=0)
if lora_rank and init_from == "scratch":
    fail("--lora_rank trains adapters on a trained model: add --init_from=huginn-0125 (or its folder)")
if fsdp and "RANK" not in os.environ:
    fail("--fsdp shards the model over processes: start with torchrun --nproc_per_node=N train.py ... --fsdp")
one_of(config, "lr_schedule", ("cosine", "wsd", "constant"))
if (lr_schedule == "wsd" and cooldown_iters > max_iters - warmup_iters or  # else no iteration at learning_rate
        lr_schedule == "cosine" and 0 < lr_decay_iters <= warmup_iters):
    fail(f"the schedule does not fit: wsd's --cooldown_iters at most max_iters - warmup_iters "
         f"({max_iters - warmup_iters}), cosine's --lr_decay_iters above --warmup_iters ({warmup_iters}) or 0")
steps(config, "eval_r")
MODEL_KEYS = [k for k in asdict(RecurrentConfig()) if k != "vocab_size"]
try:  # the model's own checks (RecurrentConfig.__post_init__: widths, heads, layers, r_bar, k), and LoRA's modules
    RecurrentConfig(**{k: config[k] for k in MODEL_KEYS})
    lora_pattern(lora_modules)
except (TypeError, ValueError) as err:
    fail(str(err))
device = pick_device(device)
dtype = pick_dtype(dtype, device, allowed=("bfloat16", "float32"))
if dtype == "bfloat16" and not device.startswith("cuda"):
    fail("bfloat16 autocast is supported here on CUDA only; use --dtype=float32")
if fsdp and not device.startswith("cuda") and tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6):
    fail(f"--fsdp off a GPU needs a torch newer than 2.5 (its FSDP2 needs CUDA streams); this is {torch.__version__}")

# -----------------------------------------------------------------------------------------------------------
# processes and device

ddp = "RANK" in os.environ  # started by torchrun
device_type = device.split(":")[0]
if ddp:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0  # prints, logs and saves
if fsdp and eval_iters % world_size:  # sharded weights: every process must run every evaluation forward pass
    fail(f"--fsdp: eval_iters={eval_iters} must be a multiple of the {world_size} processes")
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world_size} processes")
accum = gradient_accumulation_steps // world_size  # micro-steps on this process
set_threads(num_threads)
# weights stay float32 (but a LoRA run's frozen base, read in bf16); autocast runs the matmuls in bf16; RMSNorm and
# RoPE compute in float32, and the logits are cast to it
ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast use TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True


def generator(*key, device="cpu"):
    """Every random draw in training comes from a generator keyed by the iteration (and micro-step), so all ranks
    agree on r, a resumed run draws exactly what the uninterrupted run would have, and iter_num is the whole data
    position."""
    return keyed_generator(seed, *key, device=device)


def all_reduce_sum(t):
    if ddp:
        dist.all_reduce(t)  # SUM: gloo has no AVG
    return t


# -----------------------------------------------------------------------------------------------------------
# the run folder (one run at a time, and never over another run's checkpoint), then where to start: from scratch,
# or from its checkpoint (which also fixes the architecture, block_size included)

iter_num, best_val_loss, checkpoint = 0, float("inf"), None
released = init_from  # a fine-tuning run's base: the release's name or folder
ckpt_path = os.path.join(out_dir, "ckpt.pt")
# --overwrite: the old run's ckpt.pt, log.jsonl and config.json stay together until this run's first save replaces them
replacing = ".new" if init_from != "resume" and os.path.exists(ckpt_path) else ""  # this run's files till then
if master:
    writable_dir(out_dir)
    lock = lock_run_folder(out_dir)  # held until this process ends
if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite:  # every process stops, not the first alone
    fail(f"{ckpt_path} holds a trained model; continue it with --init_from=resume, choose another --out_dir, or "
         "replace it with --overwrite")
if init_from == "resume":
    checkpoint = read_checkpoint(ckpt_path, device, flag="--out_dir")
    if "optimizer" not in checkpoint:
        fail(f"{ckpt_path} holds a model but no optimizer state to continue from; start a new run in another --out_dir")
    # the architecture comes from the checkpoint, whatever the settings say (a fine-tuning run's from its base: only
    # its objective here, and block_size stays the length of its training rows)
    for k in ("mean_recurrence", "backprop_depth", "sigma") if "base" in checkpoint else MODEL_KEYS:
        if config[k] != checkpoint["model_config"][k] and master:
            print(f"resume: {k} = {checkpoint['model_config'][k]!r} from the checkpoint (settings said {config[k]!r})")
        config[k] = globals()[k] = checkpoint["model_config"][k]
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    if iter_num >= max_iters:
        fail(f"{ckpt_path} is at iteration {iter_num} already, --max_iters={max_iters}; raise --max_iters to train on")
    if "base" in checkpoint:  # a fine-tuning run: the same base model (and adapters) again
        released, finetune = checkpoint["base"], True
        lora = checkpoint.get("lora_config", {"rank": 0, "alpha": lora_alpha, "modules": lora_modules})
        for k in ("rank", "alpha", "modules"):  # what the adapters are, whatever the settings say
            if config[f"lora_{k}"] != lora[k] and master:
                print(f"resume: lora_{k} = {lora[k]!r} from the checkpoint (settings said {config[f'lora_{k}']!r})")
            config[f"lora_{k}"] = globals()[f"lora_{k}"] = lora[k]
    if fsdp and not checkpoint["config"].get("fsdp"):  # its optimizer state is keyed by position, FSDP's by name
        fail(f"{ckpt_path} was saved by a run without --fsdp; resume it without --fsdp (DDP or one process)")
    if "base" not in checkpoint and lora_rank:
        fail(f"--lora_rank: {ckpt_path} was trained from scratch, not fine-tuned from the release; resume it "
             "without --lora_rank")
    changed = [f"{k} {checkpoint['config'][k]!r} -> {v!r}" for k, v in config.items()
               if k in checkpoint["config"] and k not in MODEL_KEYS + ["init_from", "overwrite"]
               and checkpoint["config"][k] != v]
    if changed and master:  # allowed (a longer schedule, another eval), but then not the run it would have been
        print(f"resume: settings changed since the checkpoint: {', '.join(changed)}")
if finetune and lora_rank and importlib.util.find_spec("peft") is None:  # before the release loads
    fail("LoRA fine-tuning (--lora_rank) needs peft: pip install peft")

# -----------------------------------------------------------------------------------------------------------
# data: token files written by prepare_data.py, read as batches of numbered blocks (dataloader.py)

data = TokenData(data_dir or default_folder(dataset), block_size, dataset, block_size_flag="--block_size")
meta = data.meta
differs = vocabulary_differs(meta, checkpoint["meta"]) if init_from == "resume" else None
if differs:  # ids must mean what they meant when the checkpoint was saved
    fail(f"{data.data_dir} has another vocabulary than {ckpt_path} ({differs} differs); resume on the data it was "
         "trained on (--data_dir or --dataset)")


def get_batch(split, blocks):
    x, y = data.batch(split, blocks)
    if device_type == "cuda":  # pinned memory lets the copy run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# the fixed evaluation set: evenly spaced blocks, the same every time, so evals compare across a run
eval_batches = {split: [get_batch(split, blocks) for blocks in data.evenly_spaced(split, eval_iters * batch_size)
                         .split(batch_size)] for split in ("val", "train")}

# -----------------------------------------------------------------------------------------------------------
# model and optimizer

eval_r = sorted(set(eval_r or [1, mean_recurrence, 2 * mean_recurrence]) | {mean_recurrence})
torch.manual_seed(seed)  # the initial weights, the same on every rank
if finetune:  # the release's weights and architecture; the objective's r_bar, k and sigma are the settings'
    if meta["tokenizer"] != "huginn":
        fail(f"fine-tuning the release needs data in its tokenizer (prepare_data.py gsm8k or chat); "
             f"{data.data_dir} uses {meta['tokenizer']}")
    full_resume = checkpoint is not None and not lora_rank  # a full fine-tune holds every weight: its base may be gone
    # the release's shape from its config.json alone: checked before its weights are read (or downloaded: ~16 GB)
    shape = RecurrentConfig(**checkpoint["model_config"]) if full_resume else released_config(released)
    if block_size > shape.block_size or meta["vocab_size"] > shape.vocab_size:
        fail(f"{data.data_dir}: rows of {block_size} tokens (ids below {meta['vocab_size']}) do not fit the release "
             f"({shape.block_size} positions, {shape.vocab_size} ids); prepare it in its tokenizer, --row_len smaller")
    if full_resume:
        model = RecurrentGPT(shape).to(device)  # its weights: below
        model.rope, base = checkpoint["rope"], released  # the release's RoPE table, which it trained with
    else:  # a LoRA run's frozen base is read straight into bf16 on a GPU (never a float32 copy there); else float32
        model, release = load_released(released, device, torch.bfloat16 if lora_rank and dtype == "bfloat16"
                                       else torch.float32)
        model, base = model.requires_grad_(True).train(), release["folder"]
    for k in ("mean_recurrence", "backprop_depth", "sigma"):
        setattr(model.config, k, globals()[k])
    # the saved settings say what ran: the release's architecture (block_size stays the rows' length)
    config.update({k: getattr(model.config, k) for k in MODEL_KEYS if k != "block_size"})
    model_config = model.config
    if lora_rank:  # only the adapters train, in float32 (add_lora)
        try:
            model = add_lora(model, lora_rank, lora_alpha, lora_modules)
        except ValueError as err:
            fail(f"--{err}")
else:
    vocab_size = vocab_multiple * math.ceil(meta["vocab_size"] / vocab_multiple)  # ids above the data's: unseen
    model_config = RecurrentConfig(vocab_size=vocab_size, **{k: globals()[k] for k in MODEL_KEYS})
    model = RecurrentGPT(model_config).to(device)
if init_from == "resume" and model_config.vocab_size != checkpoint["model_config"]["vocab_size"]:
    fail(f"the checkpoint's vocabulary ({checkpoint['model_config']['vocab_size']}) is not this data's "
         f"({model_config.vocab_size}); resume with the dataset and vocab_multiple it was trained with")
if checkpoint is not None and lora_rank:  # resuming: the adapters it holds ...
    load_lora_state(model, checkpoint["lora"])
elif checkpoint is not None:  # ... or the weights
    model.load_state_dict(checkpoint["model"])
model.checkpoint_steps = activation_checkpointing
raw_model = model  # unwrapped (no DDP): what checkpoints save and evaluation runs
plan = memory_plan(raw_model, batch_size, block_size, 2 if dtype == "bfloat16" else 4, world_size if fsdp else 1,
                   activation_checkpointing)
if fsdp:
    model = raw_model = shard(model)  # in place: the model's parameters become shards
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
fresh_settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
if checkpoint is not None and fsdp:  # FSDP's optimizer state is keyed by parameter name
    set_optimizer_state_dict(raw_model, optimizer, checkpoint["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
elif checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
for group, settings in zip(optimizer.param_groups, fresh_settings):  # a resumed run: this run's weight decay and
    group.update(settings)  # betas, not the checkpoint's (lr is set at every iteration)
checkpoint = None  # free the memory
if compile:
    model.compile_pieces()  # embed, core_step and predict; the loop over r stays in Python, so r never recompiles
if ddp and not fsdp:
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                gradient_as_bucket_view=True)  # the gradients live in DDP's buckets: one copy, not two


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # never 0, not even at it=0
    if lr_schedule == "constant":
        return learning_rate
    if lr_schedule == "wsd":
        decay_start = max_iters - cooldown_iters
        progress = min(1.0, max(0.0, (it - decay_start) / max(1, cooldown_iters)))
        return learning_rate + progress * (min_lr - learning_rate)
    decay_iters = lr_decay_iters or max_iters
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------------------------------------
# evaluation, checkpoints, logging


@torch.no_grad()
def estimate_loss():
    """Mean loss over the fixed batches: val at every r of eval_r, train at r_bar. Each batch gets the same noise
    start at every r; batches are shared out over the processes and the sums added up."""
    raw_model.eval()
    losses = {}
    for split, rs in (("val", eval_r), ("train", [mean_recurrence])):
        for r in rs:
            total = torch.zeros((), device=device)
            for i in range(rank, eval_iters, world_size):
                x, y = eval_batches[split][i]
                with ctx:
                    _, loss = raw_model(x, y, num_steps=r, init_scale=init_scale,
                                        generator=generator(-1, i, device=device))
                total += loss
            losses[(split, r)] = all_reduce_sum(total).item() / eval_iters
    raw_model.train()
    return losses


def checkpoint_state():
    """Everything a run needs to continue and a reader needs to use the model. No RNG state: every random draw
    comes from generator(seed, iter_num, ...). A fine-tuning run names its base; a LoRA run keeps only the adapters.
    With FSDP every process takes part in gathering the shards."""
    if fsdp:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(raw_model, options=full)
        optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=full)
    else:
        weights, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
    state = {"model_config": asdict(model_config), "meta": meta, "config": config, "iter_num": iter_num,
             "best_val_loss": best_val_loss, "optimizer": optimizer_state}
    if finetune:  # and the release's stored RoPE table, which it ran with (not ours, which differs in the last bits)
        state.update(base=base, rope=raw_model.rope.cpu())
    if lora_rank:
        state.update(lora=lora_state(weights), lora_config={"rank": lora_rank, "alpha": lora_alpha,
                                                            "modules": lora_modules})
    else:
        state["model"] = weights
    return state


def stop_diverged(what, when):
    """Stop a run whose numbers are no longer finite, before they reach the weights or the checkpoint."""
    kept = f"{ckpt_path} is left as it was" if os.path.isfile(ckpt_path) else "no checkpoint yet"
    fail(f"{what} at iteration {iter_num}; stopped {when} ({kept}); try a lower --learning_rate")


def log(record):
    """One JSON line per log line, flushed at once, so a killed run leaves only whole lines."""
    if master:
        with open(os.path.join(out_dir, "log.jsonl" + replacing), "a") as f:
            f.write(json.dumps(record) + "\n")


device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else device_type
peak_flops = peak_bf16_flops(device_name) if dtype == "bfloat16" else None  # MFU: of a GPU's bf16 peak


# -----------------------------------------------------------------------------------------------------------
# the loop

tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # block_size as resumed
if master:
    print("settings (a valid config file):")
    for k, v in config.items():
        print(f"  {k} = {v!r}")
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, {world_size} process(es) on {device_name} "
          f"({torch.get_num_threads()} CPU threads each), {dtype}, {tokens_per_iter:,} tokens per iteration")
    if finetune:
        trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6
        what = f"LoRA rank {lora_rank} on {lora_modules}" if lora_rank else "every weight"
        print(f"fine-tuning {base}: {what}, {trained:.2f}M parameters train")
    print(f"memory plan per process: {describe(plan)}")
    restart_log(os.path.join(out_dir, "log.jsonl" + replacing), iter_num)  # a new run's empty, a resumed run's cut
    with open(os.path.join(out_dir, "config.json" + replacing), "w") as f:
        json.dump(config, f, indent=1)
    if replacing:
        print(f"{ckpt_path}, log.jsonl and config.json stay the old run's until this run saves (*.new till then)")
    print(f"eval: loss on {eval_iters * batch_size} fixed blocks; val at r = {eval_r}, train at r_bar")
    print("  iter | " + " ".join(f"{'val r=' + str(r):>9}" for r in eval_r) + " | train r_bar")

start_iter, dt_avg = iter_num, None
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        val_loss = losses[("val", mean_recurrence)]
        if master:
            print(f"{iter_num:6d} | " + " ".join(f"{losses[('val', r)]:9.4f}" for r in eval_r)
                  + f" | {losses[('train', mean_recurrence)]:9.4f}")
            log({"iter": iter_num, "val_loss": {str(r): losses[("val", r)] for r in eval_r},
                 "train_loss": losses[("train", mean_recurrence)]})
        for split in ("val", "train"):  # a diverged model never replaces the last good one
            if not math.isfinite(losses[(split, mean_recurrence)]):
                stop_diverged(f"{split} loss {losses[(split, mean_recurrence)]} at r_bar", "before saving")
        if iter_num > start_iter and (val_loss < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, val_loss)
            state = checkpoint_state()  # every process: gathering FSDP's shards takes them all
            if master:
                save_checkpoint(state, ckpt_path)
                print(f"saved {ckpt_path} at iteration {iter_num}")
                for name in ("log.jsonl", "config.json") if replacing else ():  # the old run's go with its ckpt.pt
                    os.replace(os.path.join(out_dir, name + replacing), os.path.join(out_dir, name))
            replacing = ""
            state = None
    if iter_num >= max_iters:
        break

    # one iteration: r is drawn once for all its micro-steps, the same on every rank
    t0 = time.time()
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    r = sample_num_steps(mean_recurrence, sigma, generator(iter_num))
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        key = (iter_num, rank * accum + micro)  # its place in the global batch: 1 process x accum 2 draws as 2 x 1
        x, y = get_batch("train", torch.randint(data.num_blocks("train"), (batch_size,), generator=generator(*key, 0)))
        # FSDP reduce-scatters the gradients after every micro-step, so a process holds only its shard of them
        # (delaying it to the last micro-step would keep the whole model's gradients in each: 13 GiB at 3.5B)
        if ddp and not fsdp:  # DDP all-reduces them only once, after the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with ctx:  # the noise start s_0 comes from the micro-step's own generator
            _, loss = model(x, y, num_steps=r, init_scale=init_scale, generator=generator(*key, 1, device=device))
        # the gradient of the mean over micro-steps (and, through DDP's averaging, over processes)
        (loss / accum).backward()
        loss_sum += loss.detach()
    # the logged loss is the true mean over the whole batch, not the last micro-step's
    step_loss = all_reduce_sum(loss_sum).item() / (accum * world_size)
    if not math.isfinite(step_loss):
        stop_diverged(f"loss {step_loss}", "before the update")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad],
                                               grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: DTensor
    if not math.isfinite(grad_norm):  # a finite loss can still have an overflowing gradient
        stop_diverged(f"gradient norm {grad_norm}", "before the update")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device_type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t0
    if iter_num > start_iter + 2:  # the first iterations compile; leave them out of the average
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt

    if iter_num % log_interval == 0 and master:
        n_grad = min(r, backprop_depth)
        flops = raw_model.estimate_flops_per_token(r, block_size, frozen=bool(lora_rank), prelude_trains=not lora_rank
                                                   or "prelude" in lora_modules.split(",")) * tokens_per_iter
        mfu = f"{100 * flops / dt / (peak_flops * world_size):.1f}%" if peak_flops else "n/a"
        eta = format_seconds((max_iters - iter_num - 1) * (dt_avg or dt))
        print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, r {r} ({r - n_grad}+{n_grad}), "
              f"{dt * 1000:.0f} ms, {tokens_per_iter / dt:,.0f} tok/s, mfu {mfu}, eta {eta}")
        log({"iter": iter_num, "loss": step_loss, "lr": lr, "r": r, "n_grad": n_grad, "grad_norm": grad_norm,
             "ms": dt * 1000, "tok_per_s": tokens_per_iter / dt, "mfu": mfu})
    iter_num += 1

if master:
    print(f"peak memory of this process: {peak_memory(device) / 2**30:.2f} GiB (the plan said "
          f"{plan['total'] / 2**30:.2f} GiB besides torch itself)")
if ddp:
    dist.destroy_process_group()
