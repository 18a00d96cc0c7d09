"""
bench.py's section 3 at the released size (--preset=huginn-0125: random weights made in seconds; or
--decode_out_dir=<a folder in the released layout>). Each variant runs in a process of its own (bench.py run again
with --decode_child), so that its load time and peak memory are its own; the same prompt and zero noise start in
all, so greedy tokens compare. Batch-1 decoding at this size is bound by the bytes of weights read per token: the
table puts each rate beside that bound on this machine. s: bench.py's settings.
"""

import json
import math
import statistics
import subprocess
import sys
import time

import torch

from checkpoints import from_pretrained, pretrained_config
from configurator import fail
from decode import generate
from linear_kernels import compile_for_decoding
from model import RecurrentGPT, config_from_preset, precompute_rope


def timed(s, fn, wall=False):
    """Seconds of fn() on bench.py's --timer (wall, or this process's CPU time) or the wall clock, the GPU drained
    before and after."""
    clock = time.perf_counter if wall or s.timer == "wall" else time.process_time
    sync = (lambda: torch.cuda.synchronize(s.device)) if s.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0


RELEASED_VARIANTS = {"eager": {}, "compiled": dict(compile=True), "int8": dict(quantize="int8"),
                     "kl exit": dict(exit_criterion="kl")}


def random_released_model(s):
    """Huginn-0125's shapes with random weights, made in seconds (uniform with the init's std, rather than its slow
    truncated normal), for speed and memory only: no download needed."""
    with torch.device("meta"):
        model = RecurrentGPT(config_from_preset("huginn-0125"))
    model = model.to_empty(device=s.device).requires_grad_(False)
    model.lm_head.weight = model.wte.weight  # to_empty gave each its own memory: tie them again
    std = math.sqrt(2 / (5 * model.config.n_embd))
    generator = torch.Generator(s.device).manual_seed(s.seed)
    for p in model.parameters():
        p.uniform_(-std * 3**0.5, std * 3**0.5, generator=generator) if p.dim() >= 2 else p.fill_(1.0)
    model.rope = precompute_rope(model.config.n_embd // model.config.n_head, model.config.block_size,
                                 model.config.rope_base).to(s.device)  # to_empty left the buffer unset
    return model.eval()


def memory_gb(key):
    """VmRSS (now) or VmHWM (peak) of this process in GB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e9 for line in f if line.startswith(key + ":"))


def decode_child_run(s, variant):
    """In the child: load, decode with one variant at every r, print the figures as one JSON line."""
    kwargs = RELEASED_VARIANTS[variant]
    t0 = time.perf_counter()
    if s.released_folder:
        model = from_pretrained(s.released_folder, device=s.device, quantize=kwargs.get("quantize"))
    else:
        model = random_released_model(s)
    load_seconds = time.perf_counter() - t0
    if kwargs.get("compile"):  # at this size: the weights packed in place (linear_kernels.compile_for_decoding)
        compile_for_decoding(model, s.compile_backend, freeze=False)
    prompt = torch.randint(0, model.config.vocab_size, (1, s.prompt_len), generator=s.g).to(s.device)
    figures = {"variant": variant, "load_seconds": load_seconds, "rate": {}, "tokens": {}}
    for r_i in s.decode_r:
        run = lambda n: generate(model, prompt, n, r_i, temperature=0, init_scale=0, **kwargs)
        run(2)  # warm-up: first reads of the weights, and compiling (the second token is the first one-token pass)
        times = [(timed(s, lambda: run(1)), timed(s, lambda: run(s.new_tokens))) for _ in range(s.decode_repeats)]
        first, total = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        figures["rate"][str(r_i)] = (s.new_tokens - 1) / (total - first)
        figures["tokens"][str(r_i)] = run(s.new_tokens)[0][0, s.prompt_len:].tolist()
    figures.update(rss_gb=memory_gb("VmRSS"), peak_gb=memory_gb("VmHWM"))
    print(json.dumps(figures))


def stream_bandwidth(s):
    """Bytes per second this machine reads from memory: the faster of two readers of 1 GB (a sum, and on a CPU a
    matrix-vector product in oneDNN's packed layout, which reads faster than the sum), best of 5 each."""
    x = torch.ones(2**28, device=s.device)
    readers = [lambda: x.sum()]
    if s.device_type == "cpu":
        packed = torch.ops.mkldnn._reorder_linear_weight(x.view(2**14, 2**14), 1)
        v = torch.ones(1, 2**14)
        readers.append(lambda: torch.ops.mkldnn._linear_pointwise(v, packed, None, "none", [], ""))
    return max(4 * 2**28 / min(timed(s, read, wall=True) for _ in range(5)) for read in readers)  # bytes per wall s


def released_bytes_per_token(config, r, bytes_per_weight):
    """Bytes of weights one token reads at r: prelude, coda and lm_head once, the core and the adapter r times."""
    block = 4 * config.n_embd**2 + 3 * config.n_embd * config.intermediate_size  # Wqkv, proj, fc, mlp.proj
    once = (config.n_layers_prelude + config.n_layers_coda) * block + config.n_embd * config.vocab_size
    return bytes_per_weight * (once + r * (config.n_layers_core * block + 2 * config.n_embd**2))


def released_section(s):
    """Every variant in a process of its own (decode_child_run), beside the machine's bandwidth bound."""
    runs = {}
    for variant in RELEASED_VARIANTS:
        child = subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], f"--decode_child={variant}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            fail(f"decoding ({variant}) failed: {(child.stderr.strip() or 'no output').splitlines()[-1]}")
        runs[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    return {"bandwidth_bytes_per_s": stream_bandwidth(s), "runs": runs, "dtype": "float32"}  # whatever --dtype says


def print_released(s, result):
    bandwidth, runs = result["bandwidth_bytes_per_s"], result["runs"]
    released = pretrained_config(s.released_folder) if s.released_folder else config_from_preset("huginn-0125")
    print(f"\ndecoding at the released size ({s.released_folder or 'random weights'}, float32 weights whatever "
          f"--dtype says), batch 1, greedy, prompt {s.prompt_len}, {s.new_tokens} tokens, median of "
          f"{s.decode_repeats}; memory bandwidth {bandwidth / 1e9:.1f} GB/s; load in wall seconds; peak and RSS: the "
          f"process's host memory")
    print(f"  {'r':>3} {'variant':<10} {'load s':>7} {'peak GB':>8} {'RSS GB':>7} {'tok/s':>7} {'x eager':>8} "
          f"{'bound tok/s':>12} {'same tokens':>12}")
    for r_i in map(str, s.decode_r):
        for variant, run in runs.items():
            bound = bandwidth / released_bytes_per_token(released, int(r_i), 1 if variant == "int8" else 4)
            same = "(exits)" if "exit" in variant else str(run["tokens"][r_i] == runs["eager"]["tokens"][r_i])
            print(f"  {r_i:>3} {variant:<10} {run['load_seconds']:7.1f} {run['peak_gb']:8.2f} {run['rss_gb']:7.2f} "
                  f"{run['rate'][r_i]:7.3f} {run['rate'][r_i] / runs['eager']['rate'][r_i]:8.2f} {bound:12.3f} "
                  f"{same:>12}")


# -----------------------------------------------------------------------------------------------------------
