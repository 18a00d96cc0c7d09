"""
Train the recurrent-depth model. On one CPU, GPU or Mac:

    python prepare_data.py shakespeare_char
    python train.py config/train_shakespeare_char.py

On several GPUs of one machine (DDP), or on CPU with gloo:

    torchrun --standalone --nproc_per_node=8 train.py config/train_small_gpu.py

Continue a run exactly where its last checkpoint left off:  python train.py <same config> --init_from=resume
Evaluate a checkpoint (val loss by depth; accuracy by difficulty for reasoning data):  ... --eval_only

Every step draws a new depth r (paper section 3.3) and back-propagates through only the last k iterations;
the depth loop stays in Python and only its fixed-shape pieces are compiled, so a new r never recompiles.
"""

import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure, fail
from model import RecurrentConfig, RecurrentGPT, sample_num_steps

# -----------------------------------------------------------------------------------------------------------
# settings (defaults: the ~96M "small" model on one GPU); override with config/*.py and --key=value
# I/O
out_dir = "out"
init_from = "scratch"         # "scratch" or "resume" (from out_dir/ckpt.pt)
eval_interval = 250           # evaluate (and save) every this many iterations, and at the end
eval_iters = 20               # batches in the fixed validation set
eval_depths = []              # val loss at these r; [] means 1, 4, r_bar, 2 r_bar
accuracy_depths = [1, 2, 4, 8, 16, 32, 64]  # exact-match accuracy at these r, for data with val_difficulty.bin
log_interval = 10
eval_only = False             # evaluate once and stop
always_save_checkpoint = True  # else save only when val loss at r_bar improves
# data
dataset = "shakespeare"
data_dir = ""                 # "" means data/<dataset> next to this file
batch_size = 16               # sequences per micro-step (per process)
block_size = 1024             # tokens per sequence
gradient_accumulation_steps = 4  # micro-steps per optimizer step, summed over all processes
# model (the fields of RecurrentConfig; vocab_size comes from the data)
n_embd = 768
n_head = 12
n_layers_prelude = 2
n_layers_core = 4
n_layers_coda = 2
intermediate_size = 2048
mean_recurrence = 8           # r_bar
backprop_depth = 4            # k
sigma = 0.5
rope_base = 50_000.0
norm_eps = 1e-6
qk_bias = True
tie_embeddings = True
init_scale = 1.0              # std of the noise state s_0, relative to the model's default
# optimizer: AdamW
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 disables
# learning-rate schedule: linear warmup, then "cosine" (to min_lr at lr_decay_iters), "wsd" (warmup-stable-decay:
# constant, then linear to min_lr over the last cooldown_iters) or "constant"
lr_schedule = "cosine"
warmup_iters = 100
lr_decay_iters = 0            # 0 means max_iters
cooldown_iters = 1000
min_lr = 6e-5
# system
device = ""                   # "" picks cuda > mps > cpu; or "cpu", "cuda", "cuda:1", "mps"
dtype = ""                    # "" means bfloat16 autocast on CUDA (if supported), float32 elsewhere
compile = True                # torch.compile the model's fixed-shape pieces
seed = 1337
# -----------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_")
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))}
config = configure(settings, sys.argv[1:])
globals().update(config)
for k in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "eval_interval", "log_interval"):
    if config[k] < 1:
        fail(f"{k} must be at least 1, got {config[k]}")
MODEL_KEYS = [k for k in asdict(RecurrentConfig()) if k != "vocab_size"]

# -----------------------------------------------------------------------------------------------------------
# processes and device

ddp = "RANK" in os.environ  # started by torchrun
if not device:
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
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
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world_size} processes")
accum = gradient_accumulation_steps // world_size  # micro-steps on this process
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size

if not dtype:
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if dtype not in ("bfloat16", "float32"):
    fail(f"dtype must be bfloat16 or float32, got {dtype!r}")
if dtype == "bfloat16" and device_type != "cuda":
    fail("bfloat16 autocast is supported here on CUDA only; use --dtype=float32")
# weights stay float32; autocast runs the matmuls in bf16 (RMSNorm, RoPE and the logits stay float32)
ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast use TF32 tensor cores
    torch.backends.cudnn.allow_tf32 = True


def generator(*key, device="cpu"):
    """A generator seeded from (seed, *key). Every random draw in training comes from one of these, keyed by
    the iteration (and micro-step), so all ranks agree on the depth, a resumed run draws exactly what the
    uninterrupted run would have, and iter_num is the whole data position. (hash of a tuple of ints is the
    same in every Python process; only str hashes are salted.)"""
    return torch.Generator(device).manual_seed(hash((seed, *key)) % 2**63)


def all_reduce_sum(t):
    if ddp:
        dist.all_reduce(t)  # SUM: gloo has no AVG
    return t


# -----------------------------------------------------------------------------------------------------------
# where to start: from scratch, or from a checkpoint (which also fixes the architecture, block_size included)

iter_num, best_val_loss = 0, float("inf")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from == "resume":
    if not os.path.isfile(ckpt_path):
        fail(f"--init_from=resume: no checkpoint at {ckpt_path}; train from scratch first (--init_from=scratch)")
    try:
        checkpoint = torch.load(ckpt_path, map_location=device)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:  # truncated zip, bad pickle
        fail(f"checkpoint {ckpt_path} is corrupt ({str(e).splitlines()[0].split('. ')[0]}); delete it or restore a copy")
    if not isinstance(checkpoint, dict) or not {"model", "model_config", "optimizer", "iter_num"} <= checkpoint.keys():
        fail(f"{ckpt_path} is not a checkpoint written by train.py; delete it or restore a copy")
    for k in MODEL_KEYS:  # the architecture comes from the checkpoint, whatever the settings say
        if config[k] != checkpoint["model_config"][k] and master:
            print(f"resume: {k} = {checkpoint['model_config'][k]!r} from the checkpoint (settings said {config[k]!r})")
        config[k] = globals()[k] = checkpoint["model_config"][k]
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
elif init_from != "scratch":
    fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")

# -----------------------------------------------------------------------------------------------------------
# data: token streams written by prepare_data.py (format in its docstring)

data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
for name in ("train.bin", "val.bin", "meta.json"):
    if not os.path.isfile(os.path.join(data_dir, name)):
        fail(f"no {name} in {data_dir}; run: python prepare_data.py {dataset}")
with open(os.path.join(data_dir, "meta.json")) as f:
    meta = json.load(f)
row_len = meta.get("row_len")  # rows of a fixed length (reasoning data): batches are whole rows
aligned = os.path.isfile(os.path.join(data_dir, "train_targets.bin"))  # targets given per position
if (aligned or row_len is not None) and not os.path.isfile(os.path.join(data_dir, "val_targets.bin")):
    fail(f"{data_dir} has rows or aligned targets but no val_targets.bin; prepare the dataset again")
NO_LOSS = 65535  # the target id that means "no loss here"


def tokens(name):
    # memmap again on every call, as nanoGPT does: a long-lived memmap keeps growing in RAM (nanoGPT #287)
    return np.memmap(os.path.join(data_dir, name), dtype=np.uint16, mode="r")


split_len = {split: len(tokens(f"{split}.bin")) for split in ("train", "val")}
if row_len is not None and block_size != row_len:
    fail(f"this dataset is made of rows of {row_len} tokens; set --block_size={row_len}")
for split, n in split_len.items():
    if n < block_size + (not aligned):
        fail(f"block_size={block_size} is too long for {split}.bin ({n} tokens); lower --block_size")


def max_start(split):
    """The last start position of a block in this split: whole rows, or anywhere with room for the targets."""
    if row_len is not None:
        return split_len[split] // row_len - 1  # in rows
    return split_len[split] - block_size - (not aligned)  # the shifted target needs one token more


def get_batch(split, starts):
    """x, y (B, T) int64 for blocks starting at `starts` (row indices when the data is made of rows).
    y is x shifted by one, or the aligned targets with "no loss" mapped to -1 (cross_entropy's ignore_index)."""
    if row_len is not None:
        starts = starts * row_len
    data = tokens(f"{split}.bin")
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in starts.tolist()])
    if aligned:
        targets = tokens(f"{split}_targets.bin")
        y = torch.stack([torch.from_numpy(targets[i : i + block_size].astype(np.int64)) for i in starts.tolist()])
        y[y == NO_LOSS] = -1
    else:
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts.tolist()])
    if device_type == "cuda":  # pinned memory lets the copy run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def random_starts(split, key):
    return torch.randint(max_start(split) + 1, (batch_size,), generator=generator(*key))


# the fixed evaluation set: evenly spaced blocks, the same every time, so evals are comparable across a run
def fixed_batches(split):
    starts = torch.linspace(0, max_start(split), eval_iters * batch_size).long()
    return [get_batch(split, s) for s in starts.split(batch_size)]


eval_batches = {"val": fixed_batches("val"), "train": fixed_batches("train")}

# -----------------------------------------------------------------------------------------------------------
# model and optimizer

if mean_recurrence < 1:
    fail(f"mean_recurrence must be at least 1, got {mean_recurrence}")
eval_depths = sorted(set(eval_depths or [1, 4, mean_recurrence, 2 * mean_recurrence]) | {mean_recurrence})
for r in eval_depths + list(accuracy_depths):
    if not isinstance(r, int) or r < 1:
        fail(f"depths must be positive integers, got {r!r}")
if lr_schedule not in ("cosine", "wsd", "constant"):
    fail(f"lr_schedule must be 'cosine', 'wsd' or 'constant', got {lr_schedule!r}")

torch.manual_seed(seed)  # the initial weights, the same on every rank
model_config = RecurrentConfig(vocab_size=meta["vocab_size"], **{k: globals()[k] for k in MODEL_KEYS})
if init_from == "resume" and model_config.vocab_size != checkpoint["model_config"]["vocab_size"]:
    fail(f"the checkpoint's vocabulary ({checkpoint['model_config']['vocab_size']}) is not {dataset}'s "
         f"({model_config.vocab_size}); resume with the dataset it was trained on")
model = RecurrentGPT(model_config).to(device)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == "resume":
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    checkpoint = None  # free the memory
raw_model = model  # unwrapped (no DDP): what checkpoints save and evaluation runs

if compile:
    model.compile_pieces()  # embed, core_step and predict; the depth loop stays in Python, so r never recompiles
if ddp:
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)


def noise_state(x, key):
    """s_0 for a batch (B, T, h), from a keyed generator (see `generator`) on the model's device."""
    template = torch.empty(*x.shape, n_embd, device=device)  # initial_state only reads e's shape
    return raw_model.initial_state(template, init_scale, generator=generator(*key, device=device))


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
    """Mean loss over the fixed batches: val at every eval depth, train at r_bar. Each batch gets the same
    noise start at every depth; batches are shared out over the processes and the sums added up."""
    raw_model.eval()
    losses = {}
    for split, depths in (("val", eval_depths), ("train", [mean_recurrence])):
        for r in depths:
            total = torch.zeros((), device=device)
            for i in range(rank, eval_iters, world_size):
                x, y = eval_batches[split][i]
                with ctx:
                    _, loss = raw_model(x, y, num_steps=r, state=noise_state(x, (-1, i)))
                total += loss
            losses[(split, r)] = all_reduce_sum(total).item() / eval_iters
    raw_model.train()
    return losses


@torch.no_grad()
def evaluate_accuracy(depths):
    """Exact-match accuracy by difficulty and test-time depth r over the whole validation set.

    A problem is a maximal run of consecutive labelled positions of one difficulty inside a row; it counts as
    solved when the argmax prediction is right at every one of its positions (aligned targets: see prepare_data.py).
    Prints a table and writes it to out_dir/accuracy.json."""
    length = block_size  # whole rows (block_size == row_len when the data has rows)
    n_rows = split_len["val"] // length
    y = tokens("val_targets.bin")[: n_rows * length].astype(np.int64).reshape(n_rows, length)
    difficulty = tokens("val_difficulty.bin")[: n_rows * length].astype(np.int64).reshape(n_rows, length)
    labelled = y != NO_LOSS
    # a problem starts at a labelled position whose left neighbour (same row) is unlabelled or of another difficulty
    starts = labelled.copy()
    starts[:, 1:] &= ~labelled[:, :-1] | (difficulty[:, 1:] != difficulty[:, :-1])
    problem_id = np.cumsum(starts.reshape(-1)) - 1  # (n_rows * length,), valid where labelled
    problem_difficulty = difficulty.reshape(-1)[starts.reshape(-1)]  # (n_problems,)
    n_problems = len(problem_difficulty)
    if n_problems == 0:
        fail("val_targets.bin has no labelled positions; nothing to score")
    labelled_ids = torch.from_numpy(problem_id.reshape(n_rows, length)).clamp(min=0)
    row_batches = torch.arange(n_rows).split(batch_size)

    raw_model.eval()
    solved = {}
    for r in depths:
        wrong = torch.zeros(n_problems, dtype=torch.int64)  # wrong positions per problem
        for i in range(rank, len(row_batches), world_size):
            rows = row_batches[i]
            x, targets = get_batch("val", rows)
            with ctx:
                logits, _ = raw_model(x, num_steps=r, state=noise_state(x, (-3, i)))
            miss = ((logits.argmax(-1) != targets) & (targets >= 0)).cpu()  # (B, T)
            wrong += torch.bincount(labelled_ids[rows][miss], minlength=n_problems)
        solved[r] = (all_reduce_sum(wrong.to(device)).cpu() == 0).numpy()
    raw_model.train()

    result = {"iter": iter_num, "depths": list(depths), "problems": {}, "accuracy": {}}
    for d in sorted(set(problem_difficulty.tolist())) + ["all"]:
        mask = problem_difficulty == d if d != "all" else np.ones(n_problems, dtype=bool)
        result["problems"][str(d)] = int(mask.sum())
        result["accuracy"][str(d)] = {str(r): float(solved[r][mask].mean()) for r in depths}
    if master:
        print(f"exact-match accuracy on {n_problems:,} val problems, by difficulty (rows) and depth r (columns)")
        print(f"{'difficulty':>10} {'problems':>8} " + " ".join(f"{'r=' + str(r):>6}" for r in depths))
        for d, accs in result["accuracy"].items():
            print(f"{d:>10} {result['problems'][d]:>8} " + " ".join(f"{accs[str(r)]:6.3f}" for r in depths))
        with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def save_checkpoint():
    """Write to a temporary file, then rename: os.replace is atomic, so a crash or kill -9 at any moment
    leaves either the old checkpoint or the new one, never half a file."""
    checkpoint = {
        "model": raw_model.state_dict(),
        "model_config": asdict(model_config),
        "meta": meta,
        "config": config,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "optimizer": optimizer.state_dict(),
        # no RNG state is needed: every random draw comes from generator(seed, iter_num, ...)
    }
    tmp_path = ckpt_path + ".tmp"
    with open(tmp_path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so even a power cut cannot leave a torn file
    os.replace(tmp_path, ckpt_path)


def log(record):
    """One JSON line per log line, flushed at once, so a killed run leaves only whole lines."""
    if master:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# dense bf16 tensor-core peaks from the vendors' datasheets, matched by substring of the device name (first wins)
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]
device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else device_type
peak_flops = next((p for name, p in PEAK_BF16_FLOPS if name in device_name and dtype == "bfloat16"), None)


def format_time(seconds):
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# -----------------------------------------------------------------------------------------------------------
# the loop

if master:
    os.makedirs(out_dir, exist_ok=True)
    print("settings (a valid config file):")
    for k, v in config.items():
        print(f"  {k} = {v!r}")
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, {world_size} process(es) on {device_name}, "
          f"{dtype}, {tokens_per_iter:,} tokens per iteration")
    if init_from == "scratch" and not eval_only:
        open(os.path.join(out_dir, "log.jsonl"), "w").close()  # a new run starts a new log
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"eval: loss on {eval_iters * batch_size} fixed blocks; val at r = {eval_depths}, train at r_bar")
    print("  iter | " + " ".join(f"{'val r=' + str(r):>9}" for r in eval_depths) + " | train r_bar")

start_iter = iter_num
has_difficulty = row_len is not None and os.path.isfile(os.path.join(data_dir, "val_difficulty.bin"))
dt_avg = None
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()
        val_loss = losses[("val", mean_recurrence)]
        if master:
            print(f"{iter_num:6d} | " + " ".join(f"{losses[('val', r)]:9.4f}" for r in eval_depths)
                  + f" | {losses[('train', mean_recurrence)]:9.4f}")
            log({"iter": iter_num, "val_loss": {str(r): losses[("val", r)] for r in eval_depths},
                 "train_loss": losses[("train", mean_recurrence)]})
        if iter_num > start_iter and (val_loss < best_val_loss or always_save_checkpoint) and not eval_only:
            best_val_loss = min(best_val_loss, val_loss)
            if master:
                save_checkpoint()
                print(f"saved {ckpt_path} at iteration {iter_num}")
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step: the depth is drawn once for the whole step, the same on every rank
    t0 = time.time()
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_no_grad, n_grad = sample_num_steps(mean_recurrence, backprop_depth, sigma, generator=generator(iter_num))
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        key = (iter_num, rank * accum + micro)  # micro-step g of the global batch: 1 process x accum 2 == 2 x 1
        x, y = get_batch("train", random_starts("train", (*key, 0)))
        if ddp:  # all-reduce the gradients only once, after the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with ctx:
            _, loss = model(x, y, num_steps=(n_no_grad, n_grad), state=noise_state(x, (*key, 1)))
        # the gradient of the mean over micro-steps (and, through DDP's averaging, over processes)
        (loss / accum).backward()
        loss_sum += loss.detach()
    # the logged loss is the true mean over the whole batch, not the last micro-step's
    step_loss = all_reduce_sum(loss_sum).item() / (accum * world_size)
    if not math.isfinite(step_loss):
        kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.isfile(ckpt_path) else "no checkpoint yet"
        fail(f"loss is {step_loss} at iteration {iter_num}; stopped before the update ({kept}); "
             "try a lower --learning_rate")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    if iter_num > start_iter + 2:  # the first steps compile; leave them out of the average
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt

    if iter_num % log_interval == 0 and master:
        r = n_no_grad + n_grad
        flops = raw_model.estimate_flops_per_token(r, block_size, training=True) * tokens_per_iter
        mfu = f"{100 * flops / dt / (peak_flops * world_size):.1f}%" if peak_flops else "n/a"
        eta = format_time((max_iters - iter_num - 1) * (dt_avg or dt))
        print(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, depth {r} ({n_no_grad}+{n_grad}), "
              f"{dt * 1000:.0f} ms, {tokens_per_iter / dt:,.0f} tok/s, mfu {mfu}, eta {eta}")
        log({"iter": iter_num, "loss": step_loss, "lr": lr, "depth": r, "n_grad": n_grad,
             "grad_norm": grad_norm.item(), "ms": dt * 1000, "tok_per_s": tokens_per_iter / dt, "mfu": mfu})
    iter_num += 1

if has_difficulty and (eval_only or iter_num > start_iter):
    evaluate_accuracy(accuracy_depths)
if ddp:
    dist.destroy_process_group()
