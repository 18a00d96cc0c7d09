"""
Measure what the recurrence costs. Prints short tables and writes the same figures to out_dir/bench.json.

    python bench.py                                       # CPU defaults: a few minutes on 2 cores
    python bench.py --sections=decode --num_threads=1 --timer=cpu         # decoding only (docs/decoding.md's table)
    python bench.py --sections=decode --decode_out_dir=out-shakespeare-char   # decoding a trained checkpoint
    python bench.py --device=cuda --preset=small --batch_size=16 --seq_len=1024 --matmul_size=8192

1. Memory: peak training memory at r = 8, 32, 128 with k = 8, each in a fresh process (run first, before this
   process holds any GPU memory). Truncated backprop builds a graph over the last k steps only, so memory should
   not grow with r.
2. Training efficiency: FLOP/s of a recurrent training iteration (forward over r steps, backward over the last k)
   against a plain stack of the same SandwichBlocks doing the same FLOPs per iteration, and against the machine's own
   matmul peak timed in the same run (MFU without a table of hardware constants). Eager and compiled; then the
   recompilations of the compiled parts while r varies from iteration to iteration (should be none).
3. Decoding, batch 1, greedy, at each r of decode_r: tokens/s of decode.py's generate eager, compiled and
   self-speculative (compiled), with the compile time, whether the three give the same tokens, and the
   recompilations; and at the first r, recomputing the whole context for every token (no KV cache).
"""

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import pick_device, pick_dtype, set_threads, writable_dir
from configurator import configure, fail, one_of, steps, whole
from bench_released import decode_child_run, print_released, released_section
from checkpoints import load_checkpoint, read_checkpoint, released_layout, trained_init_scale
from dataloader import checkpoint_data
from decode import compile_for_decoding, generate, noise_table
from linear_kernels import quantize_int8
from model import PRESETS, RMSNorm, RecurrentConfig, RecurrentGPT, SandwichBlock, config_from_preset, precompute_rope

# -----------------------------------------------------------------------------------------------------------
# settings (override with --key=value or --key value)
device = "cpu"              # "cpu", "cuda", "cuda:1", ...
dtype = ""                  # "" (bfloat16 autocast on CUDA cards with bf16 units, else float32), "float32", "bfloat16"
num_threads = 0             # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores
timer = "wall"              # "wall" clock, or "cpu": this process's CPU time, steadier on a shared CPU-only machine
sections = "memory,train,decode"  # which parts to run
seed = 1337
out_dir = "out-bench"
# model: a preset from model.py (e.g. "small", ~96M, for a GPU; the shape below is then ignored), or "" for
# the CPU-sized shape below
preset = ""
n_embd = 256
n_head = 4
n_layers_prelude = 1
n_layers_core = 2
n_layers_coda = 1
intermediate_size = 704
vocab_size = 512
# training iterations
batch_size = 4
seq_len = 128
r = 16                      # steps of the core in the efficiency comparison (fixed: both models do known work)
backprop_depth = 8          # k
repeats = 5                 # timed iterations per variant, alternating between variants; medians are reported
matmul_size = 2048          # n of the n x n x n matmul that measures the peak; 8192 suits a big GPU
compile = True              # also time torch.compile'd iterations and count recompilations
compile_backend = "inductor"  # "eager" only captures graphs: a quick check of recompilations without codegen
compile_r = [3, 9, 17, 30]  # r of the iterations counted for recompilations, after warm-up
# memory
memory_r = [8, 32, 128]
memory_backprop_depth = 8
probe_memory_at = None      # internal: a child process that measures training memory at this r (never set by hand)
# decoding (batch 1, greedy)
decode_out_dir = ""         # "" decodes the random model above; a checkpoint's out_dir (its val text is the prompt);
                            # or a folder in the released layout (config.json + *.safetensors: the real size)
decode_child = ""           # internal: a child process that decodes with one variant at the released size
prompt_len = 256
new_tokens = 32
decode_r = [8, 32]          # r per token
draft_steps = 4             # speculative decoding: drafts at this r ...
lookahead = 4               # ... this many tokens at a time
decode_repeats = 5
config = configure(globals())

whole(config, 1, "n_embd", "n_head", "n_layers_core", "intermediate_size", "vocab_size", "batch_size", "seq_len", "r",
      "backprop_depth", "repeats", "matmul_size", "memory_backprop_depth", "prompt_len", "draft_steps", "lookahead",
      "decode_repeats")
whole(config, 0, "n_layers_prelude", "n_layers_coda", "num_threads", "seed")
whole(config, 2, "new_tokens")  # the rates are of the tokens after the first (the prompt's pass)
one_of(config, "timer", ("wall", "cpu"))
one_of(config, "compile_backend", ("inductor", "eager", "aot_eager"))
steps(config, "compile_r")
steps(config, "memory_r", allow_empty=False)
steps(config, "decode_r", allow_empty=False)
if not sections or not set(sections.split(",")) <= {"memory", "train", "decode"}:
    fail(f"--sections is a comma-separated list of memory, train and decode, got {sections!r}")
if preset and preset not in PRESETS:
    fail(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)} or leave it empty")
if probe_memory_at is not None and (type(probe_memory_at) is not int or probe_memory_at < 1):
    fail(f"--probe_memory_at is internal (a memory probe at one r >= 1), got {probe_memory_at!r}")
released_folder = decode_out_dir if decode_out_dir and released_layout(decode_out_dir) else ""
released_size = "decode" in sections and (preset == "huginn-0125" or bool(released_folder))
if draft_steps >= min(decode_r) and not released_size:
    fail(f"--draft_steps ({draft_steps}) must be below every r of --decode_r ({decode_r}): drafts are cheap guesses")
try:  # the model's own checks of the shape (widths, heads)
    RecurrentConfig(**{k: config[k] for k in ("n_embd", "n_head", "n_layers_prelude", "n_layers_core",
                                              "n_layers_coda", "intermediate_size", "vocab_size")})
except ValueError as err:
    fail(str(err))
if "decode" in sections and decode_out_dir and not released_folder:  # its val text prompts it: room in block_size?
    saved = read_checkpoint(os.path.join(decode_out_dir, "ckpt.pt"), flag="--decode_out_dir", mmap=True)["model_config"]
    if saved["block_size"] < new_tokens + lookahead + 2:
        fail(f"--decode_out_dir's block_size {saved['block_size']} leaves no room for a prompt: lower --new_tokens")
if probe_memory_at is None:
    writable_dir(out_dir)  # bench.json goes there at the end

# device and precision
device = pick_device(device)
device_type = device.split(":")[0]
dtype = pick_dtype(dtype, device, allowed=("float32", "bfloat16"))
ptdtype = getattr(torch, dtype)
ctx = torch.autocast(device_type, dtype=ptdtype) if dtype == "bfloat16" else nullcontext()
if timer == "cpu" and device_type == "cuda":
    fail("--timer=cpu times this process's CPU, not the GPU; use --timer=wall with --device=cuda")
clock = time.perf_counter if timer == "wall" else time.process_time
set_threads(num_threads)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn):
    """Seconds of fn(), with the GPU drained before and after."""
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0


# -----------------------------------------------------------------------------------------------------------
# The models


def model_config(k):
    shape = {} if preset else dict(vocab_size=vocab_size, n_embd=n_embd, n_head=n_head, n_layers_core=n_layers_core,
                                   n_layers_prelude=n_layers_prelude, n_layers_coda=n_layers_coda,
                                   intermediate_size=intermediate_size)
    # mean_recurrence only sets the init scale here; the benchmark always passes r explicitly
    run = dict(block_size=max(seq_len, prompt_len + new_tokens + lookahead + 1), mean_recurrence=r, backprop_depth=k)
    return config_from_preset(preset, **shape, **run) if preset else RecurrentConfig(**shape, **run)


class PlainGPT(nn.Module):
    """The baseline: an ordinary transformer, n_layer SandwichBlocks (the very class the recurrent model loops)
    between the same scaled embedding, final norm and tied head. Its weights do not matter for speed."""

    def __init__(self, config, n_layer):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(SandwichBlock(config) for _ in range(n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        rope = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, idx, targets, num_steps=None):  # num_steps is ignored: a plain stack has no loop
        rope = self.rope[: idx.size(1)]
        x = self.wte(idx) * math.sqrt(self.wte.embedding_dim)  # (B, T, h)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x)).float()
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def plain_flops_per_token(config, n_layer, T):
    """Counted as RecurrentGPT.estimate_flops_per_token counts: 2 FLOPs per weight per token in every matmul plus
    unmasked attention (4*T*h per layer) forward, twice that backward."""
    h = config.n_embd
    block = 2 * (4 * h * h + 3 * h * config.intermediate_size) + 4 * T * h
    return 3 * (n_layer * block + 2 * h * config.vocab_size)


def train_iteration(model, optimizer, x, y, r):
    """One training iteration: forward (r steps for the recurrent model), backward, AdamW. Returns the seconds
    of forward + backward (the counted FLOPs) and of the whole iteration (AdamW's cost grows with the parameters)."""
    sync()
    t0 = clock()
    with ctx:
        _, loss = model(x, y, num_steps=r)
    loss.backward()
    sync()
    t1 = clock()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return t1 - t0, clock() - t0


def peak_rss():
    """The process's peak resident memory in bytes: Linux's VmHWM, afresh in an exec'd child; ru_maxrss, which a child
    inherits from its parent, only as the fallback (KiB on Linux, bytes on macOS)."""
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def make_optimizer(model):
    return model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type) if isinstance(model, RecurrentGPT) else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device_type == "cuda")


def compile_blocks(plain):
    """Compile each block on its own: the blocks share one class and one compiled graph (regional compilation),
    the same granularity as the recurrent model's compiled parts."""
    for block in plain.blocks:
        block.compile(backend=compile_backend)
    return plain


# random tokens: speed and memory do not depend on the data (on the device only where a part needs them)
torch.manual_seed(seed)
g = torch.Generator().manual_seed(seed)
cfg = model_config(backprop_depth)
x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)
y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)

# -----------------------------------------------------------------------------------------------------------
# Memory probe: in the child process, training iterations at r, then report the peak and exit

if probe_memory_at is not None:
    x, y = x.to(device), y.to(device)
    model = RecurrentGPT(model_config(memory_backprop_depth)).to(device)
    optimizer = make_optimizer(model)
    # baseline: weights, gradients and AdamW moments all exist, so the iteration's peak is its activations on top
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    if device_type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = peak_rss()
    for _ in range(2):  # the second iteration runs with all state allocated, as in a long run
        train_iteration(model, optimizer, x, y, probe_memory_at)
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss()
    print(json.dumps({"r": probe_memory_at, "peak_bytes": peak, "baseline_bytes": base}))
    sys.exit(0)

released_settings = SimpleNamespace(**{**config, "device": device, "device_type": device_type,
                                       "released_folder": released_folder, "g": g})  # for bench_released.py
if decode_child:
    decode_child_run(released_settings, decode_child)
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------------
# 1. Peak training memory against r, each r in a fresh process (a process's peak memory only ever grows). First,
#    while this process holds no GPU memory of its own: a parent's cache would crowd its children out

def memory_section():
    probes = []
    for r_i in memory_r:
        child = subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], f"--probe_memory_at={r_i}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            fail(f"the memory probe at r={r_i} failed: {(child.stderr.strip() or 'no output').splitlines()[-1]}")
        probes.append(json.loads(child.stdout.strip().splitlines()[-1]))
    first, last = probes[0], probes[-1]
    return {"kind": "torch.cuda.max_memory_allocated" if device_type == "cuda" else "peak RSS",
            "backprop_depth": memory_backprop_depth, "probes": probes,
            "ratio_peak": last["peak_bytes"] / first["peak_bytes"],
            "ratio_above_baseline": (last["peak_bytes"] - last["baseline_bytes"])
            / (first["peak_bytes"] - first["baseline_bytes"])}


def print_memory(mem):
    probes, first, last = mem["probes"], mem["probes"][0], mem["probes"][-1]
    print(f"\npeak training memory, backprop through min(r, k={memory_backprop_depth}) steps ({mem['kind']})")
    print("  r              " + "".join(f"{m['r']:>9}" for m in probes) + f"   r={last['r']}/r={first['r']}")
    print("  peak MB        " + "".join(f"{m['peak_bytes'] / 2**20:9.1f}" for m in probes)
          + f"   {mem['ratio_peak']:.3f}")
    print("  its own MB     " + "".join(f"{(m['peak_bytes'] - m['baseline_bytes']) / 2**20:9.1f}" for m in probes)
          + f"   {mem['ratio_above_baseline']:.3f}")


# -----------------------------------------------------------------------------------------------------------
# 2. Training: the recurrent model against a plain transformer with the same FLOPs per training iteration, and
#    against the machine's matmul peak timed in the same rounds (a busy shared machine slows all alike)

def training_variants():
    """The recurrent model and a plain stack of the same blocks deep enough to match its FLOPs per iteration
    (prelude and coda run 3 times, forward and backward, the core r + 2k times: about (prelude + coda) + (r + 2k)/3
    core layers, plus the adapter's share; the whole number of layers nearest), eager and compiled."""
    model = RecurrentGPT(cfg).to(device)
    flops_recurrent = model.estimate_flops_per_token(r, seq_len, training=True) * batch_size * seq_len
    head = plain_flops_per_token(cfg, 0, seq_len)  # lm_head only (the embedding is a lookup)
    n_layer = round((flops_recurrent / (batch_size * seq_len) - head) / (plain_flops_per_token(cfg, 1, seq_len) - head))
    plain = PlainGPT(cfg, n_layer).to(device)
    flops_plain = plain_flops_per_token(cfg, n_layer, seq_len) * batch_size * seq_len
    variants = {"recurrent": (model, flops_recurrent), "plain": (plain, flops_plain)}
    if compile:
        variants["recurrent compiled"] = (copy.deepcopy(model).compile_pieces(backend=compile_backend), flops_recurrent)
        variants["plain compiled"] = (compile_blocks(copy.deepcopy(plain)), flops_plain)
    print(f"recurrent: {model.get_num_params() / 1e6:.2f}M params, prelude {cfg.n_layers_prelude} / core "
          f"{cfg.n_layers_core} / coda {cfg.n_layers_coda}, h={cfg.n_embd}; plain: "
          f"{sum(p.numel() for p in plain.parameters()) / 1e6:.2f}M params, {n_layer} layers; batch {batch_size} x "
          f"{seq_len}, r={r}, k={min(r, backprop_depth)}")
    return {name: (m, make_optimizer(m), flops) for name, (m, flops) in variants.items()}, n_layer


def train_section():
    x_, y_ = x.to(device), y.to(device)
    variants, n_layer = training_variants()
    a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=ptdtype) for _ in range(2))
    for _ in range(2):
        a @ b  # warm-up: threads, kernels, clocks
    first_iteration, times, matmul_times = {}, {name: [] for name in variants}, []
    for name, (m, opt, _) in variants.items():
        # warm-up at r > k, so the compiled core has seen both its no-grad and its grad graph; the first iteration of a
        # compiled variant includes its compilation (wall clock: inductor compiles in worker processes)
        t0 = time.perf_counter()
        train_iteration(m, opt, x_, y_, r)
        first_iteration[name] = time.perf_counter() - t0
        train_iteration(m, opt, x_, y_, r)
    for _ in range(repeats):
        matmul_times.append(timed(lambda: a @ b))
        for name, (m, opt, _) in variants.items():
            times[name].append(train_iteration(m, opt, x_, y_, r))
    peak_flops = 2 * matmul_size**3 / statistics.median(matmul_times)
    result = {"matmul_peak_flops": peak_flops, "matmul_seconds": matmul_times, "plain_n_layer": n_layer,
              "flops_per_iteration": {"recurrent": variants["recurrent"][2], "plain": variants["plain"][2]},
              "train": {}}
    for name, (_, _, flops) in variants.items():
        fwd_bwd, whole = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        result["train"][name] = {"fwd_bwd_seconds": fwd_bwd, "iteration_seconds": whole,
                                 "flops_per_s": flops / fwd_bwd, "mfu": flops / fwd_bwd / peak_flops,
                                 "first_iteration_seconds": first_iteration[name], "all_seconds": times[name]}
    tr, flops = result["train"], result["flops_per_iteration"]
    result["ratio_recurrent_plain"] = tr["recurrent"]["flops_per_s"] / tr["plain"]["flops_per_s"]
    result["ratio_recurrent_plain_whole_iteration"] = (tr["plain"]["iteration_seconds"] / tr["recurrent"][
        "iteration_seconds"] * flops["recurrent"] / flops["plain"])
    if compile:
        result["ratio_recurrent_plain_compiled"] = (tr["recurrent compiled"]["flops_per_s"]
                                                    / tr["plain compiled"]["flops_per_s"])
        result["compile_speedup"] = tr["recurrent"]["iteration_seconds"] / tr["recurrent compiled"]["iteration_seconds"]
        # recompilations: the compiled parts must serve every r with the graphs they already have
        from torch._dynamo.utils import counters
        frames_before = counters["frames"]["total"]  # frames dynamo had to (re)compile: each is a cache miss
        for r_i in compile_r:
            train_iteration(variants["recurrent compiled"][0], variants["recurrent compiled"][1], x_, y_, r_i)
        result["recompiles"], result["recompiles_r"] = counters["frames"]["total"] - frames_before, compile_r
    return result


def print_train(result):
    tr = result["train"]
    print(f"FLOPs per iteration: recurrent {result['flops_per_iteration']['recurrent'] / 1e9:.2f} G, plain "
          f"{result['flops_per_iteration']['plain'] / 1e9:.2f} G")
    print(f"matmul peak ({matmul_size}^3, {dtype}): {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"\ntraining, median of {repeats} alternating   fwd+bwd ms  GFLOP/s    MFU   iter ms  first iter s (wall)")
    for name, t in tr.items():
        print(f"  {name:<36} {t['fwd_bwd_seconds'] * 1e3:10.1f} {t['flops_per_s'] / 1e9:8.2f} {t['mfu']:6.1%} "
              f"{t['iteration_seconds'] * 1e3:9.1f} {t['first_iteration_seconds']:20.1f}")
    print(f"  recurrent / plain FLOP/s (fwd+bwd): {result['ratio_recurrent_plain']:.3f} eager" +
          (f", {result['ratio_recurrent_plain_compiled']:.3f} compiled" if compile else "") +
          f"; whole iteration with AdamW: {result['ratio_recurrent_plain_whole_iteration']:.3f} eager")
    if compile:
        print(f"  compile speedup of the recurrent iteration: {result['compile_speedup']:.2f}x")
        print(f"  recompilations over r = {compile_r} after warm-up: {result['recompiles']}")


# -----------------------------------------------------------------------------------------------------------
# 3. Decoding, batch 1, greedy. The rate after the prompt: N tokens minus 1 (the prompt's pass), so a long prompt's
#    one-off cost hides no per-token cost. Every variant draws the same noise starts: greedy tokens must agree.

def decoding_model():
    """A trained checkpoint, its own val text and the noise start it trained with; or the random model and 1."""
    if decode_out_dir:
        model, checkpoint = load_checkpoint(decode_out_dir, device, flag="--decode_out_dir")
        data = checkpoint_data(checkpoint)
        room = model.config.block_size - new_tokens - lookahead - 1
        prompt = torch.from_numpy(data.tokens(data.shards["val"][0])[:min(prompt_len, room)].astype("int64"))
        return model, prompt[None].to(device), trained_init_scale(checkpoint)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    return RecurrentGPT(cfg).to(device).eval(), prompt, 1.0


def decode_section():
    model, prompt, init_scale = decoding_model()
    compiled_model, int8_model = copy.deepcopy(model), quantize_int8(copy.deepcopy(model))
    variants = {"eager": (model, dict()), "compiled": (compiled_model, dict(compile=True)),
                "speculative": (compiled_model, dict(compile=True, draft_steps=draft_steps, lookahead=lookahead)),
                "compiled, kl exit": (compiled_model, dict(compile=True, exit_criterion="kl")),
                "int8": (int8_model, dict())}

    def decode(m, n, r_i, **kwargs):
        with ctx:
            return generate(m, prompt, n, r_i, temperature=0, init_scale=init_scale,
                            generator=torch.Generator(device).manual_seed(seed), **kwargs)

    def recompute(m, n, r_i):  # no cache: the whole context again for every token, as nanoGPT's generate does
        idx, table = prompt, noise_table(m, prompt.size(1) + n, init_scale, torch.Generator(device).manual_seed(seed))
        with torch.no_grad(), ctx:
            for _ in range(n):  # the noise start decoding draws, at each position
                logits, _ = m(idx, num_steps=r_i, state=table[None, :idx.size(1)])
                idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)
        return idx, {"steps": torch.full((1, n), r_i)}

    # compile: the one-token step, then the speculative check (lookahead + 1 tokens); wall clock, since inductor
    # compiles in worker processes. Every later call must find its graphs: the recompilations are counted
    from torch._dynamo.utils import counters
    compile_for_decoding(compiled_model, compile_backend)
    result = {"prompt": prompt.size(1), "init_scale": init_scale, "decode": {}}
    result["decode_compile_seconds"] = timed(lambda: decode(compiled_model, 2, decode_r[0], compile=True))
    result["decode_compile_speculative_seconds"] = timed(lambda: decode(compiled_model, lookahead + 1, decode_r[0],
                                                                        **variants["speculative"][1]))  # 1 round
    graphs = counters["stats"]["unique_graphs"]
    for i, r_i in enumerate(decode_r):
        runs = {name: [] for name in variants} | ({"no cache (recompute)": []} if i == 0 else {})
        for _ in range(decode_repeats):
            for name in runs:
                run = (lambda n: recompute(model, n, r_i)) if name == "no cache (recompute)" else \
                    (lambda n: decode(variants[name][0], n, r_i, **variants[name][1]))
                runs[name].append((timed(lambda: run(1)), timed(lambda: run(new_tokens)), *run(new_tokens)))
        result["decode"][str(r_i)] = {name: decode_rates(t, runs["eager"][0][2]) for name, t in runs.items()}
    result["decode_recompiles"] = counters["stats"]["unique_graphs"] - graphs
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # CUDA: graphs inductor declined to make
    return result


def decode_rates(runs, eager_tokens):
    """One variant's (first, total, tokens, stats) runs -> its rate after the prompt and what it did."""
    first, total = statistics.median(f for f, *_ in runs), statistics.median(n for _, n, *_ in runs)
    tokens, stats = runs[0][2], runs[0][3]
    rates = {"tokens_per_s": (new_tokens - 1) / (total - first), "first_token_seconds": first,
             "all_seconds": [(f, n) for f, n, *_ in runs], "mean_steps": stats["steps"].float().mean().item(),
             "same_tokens_as_eager": torch.equal(tokens, eager_tokens)}
    if stats.get("drafted"):
        rates["acceptance"] = stats["accepted"] / stats["drafted"]
    return rates


def print_decode(result):
    print(f"\ndecoding {decode_out_dir or 'the random model above'}: prompt {result['prompt']}, batch 1, greedy, "
          f"{new_tokens} tokens, median of {decode_repeats}, noise start init_scale {result['init_scale']}; "
          f"speculative: {lookahead} drafts at r = {draft_steps}")
    print(f"  {'r':>4} {'':<22} {'tok/s after the prompt':>22} {'x eager':>8} {'same tokens':>12} {'steps/token':>12}")
    for r_i, rates in result["decode"].items():
        for name, d in rates.items():
            extra = f"   {d['acceptance']:.0%} of drafts accepted" if "acceptance" in d else ""
            # fewer steps, or rounded weights: other tokens may be right
            same = "(exits)" if "exit" in name else "(int8)" if name == "int8" else str(d["same_tokens_as_eager"])
            speedup = d["tokens_per_s"] / rates["eager"]["tokens_per_s"]
            print(f"  {r_i:>4} {name:<22} {d['tokens_per_s']:22.1f} {speedup:8.2f} {same:>12} {d['mean_steps']:12.2f}"
                  + extra)
    print(f"  compiling: the one-token step {result['decode_compile_seconds']:.1f} s, the speculative check "
          f"{result['decode_compile_speculative_seconds']:.1f} s more (wall clock, first calls); recompilations "
          f"over r = {decode_r} afterwards: {result['decode_recompiles']}")
    if device_type == "cuda":  # why a step may run without its CUDA graph: TORCH_LOGS=cudagraphs says
        print(f"  CUDA graphs inductor declined to make: {result['cudagraph_skips']}")


# the run: each section measures, then prints; everything goes to out_dir/bench.json

results = {"config": config, "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
print(f"device {device}, {dtype}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, {timer} time")
if "memory" in sections:
    results["memory"] = memory_section()
    print_memory(results["memory"])
if "train" in sections:
    results.update(train_section())
    print_train(results)
if released_size:
    results["decode_released"] = released_section(released_settings)
    print_released(released_settings, results["decode_released"])
elif "decode" in sections:
    results.update(decode_section())
    print_decode(results)
with open(os.path.join(out_dir, "bench.json"), "w") as f:
    json.dump(results, f, indent=1)
print(f"\nwrote {os.path.join(out_dir, 'bench.json')}")
