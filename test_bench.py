"""bench.py end to end on a tiny model: the JSON it writes, zero recompilations as r varies, memory flat in r, and
decoding (eager, compiled, speculative) giving the same tokens."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """This file's two long runs of bench.py, side by side (one thread each, its children one at a time): "tiny",
    every section on a tiny model, and "released", the decode section on a tiny model in the released layout.
    {name: (future of its CompletedProcess, its out_dir)}."""
    from test_pretrained import reference_tensors, tiny, write_checkpoint
    tiny_dir, released_dir = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("bench_released")
    write_checkpoint(released_dir / "released", tiny(), reference_tensors(tiny()), shards=2)
    tiny_args = ["--n_embd=64", "--n_head=2", "--n_layers_prelude=1", "--n_layers_core=1", "--n_layers_coda=1",
                 "--intermediate_size=128", "--vocab_size=64", "--batch_size=8", "--seq_len=64", "--r=6",
                 "--backprop_depth=2", "--repeats=2", "--matmul_size=256",
                 # the "eager" backend captures graphs as inductor would (same guards, same recompilations), no codegen
                 "--compile_backend=eager", "--compile_r=[1, 2, 5, 11]",
                 # k=2: a graph kept alive by the 30 no-grad iterations would multiply the iteration's memory many times
                 "--memory_r=[2, 32]", "--memory_backprop_depth=2",
                 "--prompt_len=24", "--new_tokens=6", "--decode_r=[3, 5]", "--draft_steps=2", "--lookahead=2",
                 "--decode_repeats=1",
                 "--num_threads=1", f"--out_dir={tiny_dir}"]
    released_args = ["--sections=decode", f"--decode_out_dir={released_dir / 'released'}", "--decode_r=[2]",
                     "--prompt_len=8", "--new_tokens=4", "--decode_repeats=1", "--num_threads=1",
                     f"--out_dir={released_dir}"]
    with ThreadPoolExecutor(2) as pool:
        yield {"tiny": (pool.submit(bench, *tiny_args), tiny_dir),
               "released": (pool.submit(bench, *released_args), released_dir)}


@pytest.fixture(scope="module")
def results(runs):
    future, out_dir = runs["tiny"]
    run = future.result()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recurrent / plain" in run.stdout  # the table was printed
    with open(out_dir / "bench.json") as f:
        return json.load(f)


def test_plain_model_matches_flops(results):
    """The plain transformer's layer count puts its FLOPs per iteration within half a block of the recurrent's."""
    flops = results["flops_per_iteration"]
    h, I, T, B = 64, 128, 64, 8
    block = 3 * (2 * (4 * h * h + 3 * h * I) + 4 * T * h) * B * T  # one block's training FLOPs per iteration
    assert abs(flops["plain"] - flops["recurrent"]) <= block / 2
    assert results["plain_n_layer"] > 2  # deeper than prelude + coda: the core's r + 2k runs are unrolled


def test_training_figures_are_sane(results):
    """Each rate is its model's FLOPs over its own median time: the figures hang together."""
    flops, train, median = results["flops_per_iteration"], results["train"], statistics.median
    assert results["matmul_peak_flops"] == pytest.approx(2 * 256**3 / median(results["matmul_seconds"]))
    for name in ("recurrent", "plain", "recurrent compiled", "plain compiled"):
        t = train[name]
        assert 0 < t["fwd_bwd_seconds"] <= t["iteration_seconds"]
        assert t["fwd_bwd_seconds"] == median(s[0] for s in t["all_seconds"])
        assert t["flops_per_s"] == pytest.approx(flops[name.split()[0]] / t["fwd_bwd_seconds"])
        assert t["mfu"] == pytest.approx(t["flops_per_s"] / results["matmul_peak_flops"])
    assert results["ratio_recurrent_plain"] == pytest.approx(train["recurrent"]["flops_per_s"]
                                                             / train["plain"]["flops_per_s"])
    assert results["compile_speedup"] == pytest.approx(train["recurrent"]["iteration_seconds"]
                                                       / train["recurrent compiled"]["iteration_seconds"])


def test_no_recompilation_across_r(results):
    assert results["recompiles_r"] == [1, 2, 5, 11]
    assert results["recompiles"] == 0


def test_memory_flat_in_r(results):
    memory = results["memory"]
    assert [p["r"] for p in memory["probes"]] == [2, 32]
    assert all(p["peak_bytes"] > p["baseline_bytes"] > 0 for p in memory["probes"])
    assert memory["ratio_above_baseline"] < 1.5  # 16x the r, not 16x the activations


def test_decoding_figures(results):
    decode = results["decode"]
    assert set(decode) == {"3", "5"}
    variants = {"eager", "compiled", "speculative", "compiled, kl exit", "int8"}
    assert set(decode["3"]) == variants | {"no cache (recompute)"} and set(decode["5"]) == variants  # recompute: once
    for r, rates in decode.items():
        for name, d in rates.items():
            assert d["tokens_per_s"] > 0 and d["first_token_seconds"] > 0
            assert d["same_tokens_as_eager"] or name in ("compiled, kl exit", "int8")  # but exits and rounding
            assert d["mean_steps"] == int(r) or name == "compiled, kl exit"
        assert 0 <= rates["speculative"]["acceptance"] <= 1 and rates["compiled, kl exit"]["mean_steps"] <= int(r)
    assert results["decode_compile_seconds"] > 0 and results["decode_recompiles"] == 0


def test_released_size_timing_follows_the_timer():
    """--timer=cpu times the released size's decoding by this process's CPU, as the rest of bench.py (the header says
    so); it was timed by the wall clock whatever --timer said. A sleep takes wall time and next to no CPU."""
    from types import SimpleNamespace
    from bench_released import timed
    nap = lambda: time.sleep(0.2)
    assert timed(SimpleNamespace(timer="cpu", device="cpu"), nap) < 0.05
    assert timed(SimpleNamespace(timer="wall", device="cpu"), nap) >= 0.2


def test_released_size_variants_run_in_processes_of_their_own(runs):
    """--decode_out_dir=<a folder in the released layout>: every variant in a child process, with its load time,
    memory and rate beside the bandwidth bound; packed (compiled) weights give eager's tokens."""
    future, out_dir = runs["released"]
    run = future.result()
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out_dir / "bench.json") as f:
        released = json.load(f)["decode_released"]
    assert released["bandwidth_bytes_per_s"] > 0 and set(released["runs"]) == {"eager", "compiled", "int8", "kl exit"}
    for name, figures in released["runs"].items():
        assert figures["rate"]["2"] > 0 and figures["peak_gb"] >= figures["rss_gb"] > 0 and len(figures["tokens"]["2"]) == 4
    assert released["runs"]["compiled"]["tokens"] == released["runs"]["eager"]["tokens"]
    assert "bound tok/s" in run.stdout


def test_decoding_a_run_folder_of_ours(cups, tmp_path):
    """--decode_out_dir=<our run folder>: train.py writes a config.json of its settings there, which must not pass
    for the released layout (config.json beside *.safetensors). The checkpoint decodes from the noise start it
    trained with (here the zero state), as sample.py does."""
    shutil.copytree(cups.out, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    checkpoint["config"]["init_scale"] = 0.0
    torch.save(checkpoint, tmp_path / "run" / "ckpt.pt")
    run = bench("--sections=decode", f"--decode_out_dir={tmp_path / 'run'}", "--compile_backend=eager", "--decode_r=[3]",
                "--draft_steps=2", "--lookahead=2", "--prompt_len=8", "--new_tokens=4", "--decode_repeats=1",
                "--num_threads=1", f"--out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    decode = result["decode"]
    assert decode["3"]["compiled"]["same_tokens_as_eager"] and "decode_released" not in decode
    assert result["init_scale"] == 0.0 and "noise start init_scale 0.0" in run.stdout
