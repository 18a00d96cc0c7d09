"""
Tests for train.py, CPU only: exact resume, crash-safe checkpoints, DDP == gradient accumulation, no recompiles
as r changes, NaN handling, vocabulary padding (bad input: test_bad_input.py).
Every run is a real subprocess of train.py on a tiny model and the tests' own generated text (conftest.py).

    python -m pytest -q test_train.py
"""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import play_text

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# a 32-wide 1+1+1-block model on 4 x 32 tokens: a step takes milliseconds
TINY = ["--n_embd=32", "--n_head=2", "--n_layers_prelude=1", "--n_layers_core=1", "--n_layers_coda=1",
        "--intermediate_size=64", "--mean_recurrence=4", "--backprop_depth=2", "--batch_size=4", "--block_size=32",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu", "--compile=False", "--log_interval=1",
        "--warmup_iters=5", "--learning_rate=1e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Character-level data from 100k characters of generated text, made by prepare_data.py."""
    tmp = tmp_path_factory.mktemp("data")
    (tmp / "input.txt").write_text(play_text(100_000))
    subprocess.run([sys.executable, "prepare_data.py", "shakespeare_char", f"--input={tmp / 'input.txt'}",
                    f"--out_dir={tmp / 'char'}"], cwd=REPO, env=ENV, check=True, capture_output=True)
    return str(tmp / "char")


def train(*args, check=True, launcher=None):
    """Run train.py (or a launcher script that runs it) and return the finished process."""
    cmd = [sys.executable, launcher or "train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    """{iteration: logged training loss}; a resumed run's later lines win."""
    return {r["iter"]: r["loss"] for r in records(out_dir) if "loss" in r}


def test_resume_is_exact(data_dir, tmp_path):
    common = [*TINY, f"--data_dir={data_dir}", "--eval_interval=10", "--lr_decay_iters=20"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    with ThreadPoolExecutor(2) as pool:  # the straight run and the first half side by side: one thread each
        list(pool.map(lambda args: train(*common, *args), [["--max_iters=20", f"--out_dir={straight}"],
                                                           ["--max_iters=10", f"--out_dir={split}"]]))
    assert torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["iter_num"] == 10
    # settings that name another architecture are overruled by the checkpoint's, in the work and in the log
    resumed = train(*common, "--max_iters=20", f"--out_dir={split}", "--init_from=resume", "--block_size=16")
    assert "block_size = 32 from the checkpoint" in resumed.stdout and "128 tokens per iteration" in resumed.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(20))
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]  # bit for bit, not approximately
    # and one log, as if it had never stopped (the evaluation at iteration 10 was logged twice)
    kinds = lambda out: [(r["iter"], "loss" in r) for r in records(out)]
    assert kinds(split) == kinds(straight)
    assert len({r["r"] for r in records(straight) if "r" in r}) > 1  # r really varied
    final = [r["val_loss"] for r in records(straight) + records(split) if r.get("iter") == 20 and "val_loss" in r]
    assert len(final) == 2 and final[0] == final[1]
    # settings changed on a resume are said, and the optimizer runs with them (not the checkpoint's saved groups)
    resumed = train(*common, "--max_iters=21", f"--out_dir={split}", "--init_from=resume", "--weight_decay=0.5",
                    "--beta2=0.9")
    assert "settings changed since the checkpoint: max_iters 20 -> 21, weight_decay 0.1 -> 0.5, beta2 0.95 -> 0.9" \
        in resumed.stdout
    groups = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.5, (0.9, 0.9)), (0.0, (0.9, 0.9))]


# runs train.py with torch.save replaced: the second save writes half the file, says so, and hangs
HALF_SAVE = """
import io, runpy, sys, time
import torch
real_save, calls = torch.save, []
def half_save(obj, f):
    calls.append(1)
    if len(calls) == 1:
        return real_save(obj, f)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    print("HALF WRITTEN", flush=True)
    time.sleep(600)
torch.save = half_save
sys.path.insert(0, ".")
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_save_keeps_last_checkpoint(data_dir, tmp_path):
    out_dir = str(tmp_path / "out")
    launcher = tmp_path / "half_save.py"
    launcher.write_text(HALF_SAVE)
    common = [*TINY, f"--data_dir={data_dir}", "--eval_interval=4", "--lr_decay_iters=12", f"--out_dir={out_dir}"]
    proc = subprocess.Popen([sys.executable, str(launcher), *common, "--max_iters=12"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the save at iteration 8 is half on disk
        if "HALF WRITTEN" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.getsize(os.path.join(out_dir, "ckpt.pt.tmp")) > 0  # the torn file exists...
    with pytest.raises(Exception):
        torch.load(os.path.join(out_dir, "ckpt.pt.tmp"), weights_only=True)
    # ...but the last good one is whole
    assert torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["iter_num"] == 4
    before = train_losses(out_dir)
    assert sorted(before) == list(range(8))

    proc = train(*common, "--max_iters=10", "--init_from=resume")
    assert "saved" in proc.stdout
    after = train_losses(out_dir)
    assert sorted(after) == list(range(10))
    assert [after[i] for i in range(4, 8)] == [before[i] for i in range(4, 8)]  # continued from iteration 4
    assert torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["iter_num"] == 10


def test_torchrun_matches_gradient_accumulation(data_dir, tmp_path):
    common = [*TINY, f"--data_dir={data_dir}", "--eval_interval=100", "--max_iters=6",
              "--gradient_accumulation_steps=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(*common, f"--out_dir={one}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common,
           f"--out_dir={two}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == list(range(6))
    np.testing.assert_allclose([b[i] for i in range(6)], [a[i] for i in range(6)], rtol=0, atol=1e-5)
    val_a, val_b = [[r["val_loss"] for r in records(d) if r["iter"] == 6 and "val_loss" in r] for d in (one, two)]
    np.testing.assert_allclose(list(val_b[0].values()), list(val_a[0].values()), rtol=0, atol=1e-5)


# runs train.py and prints dynamo's graph count at every iteration (optimizer step). The backend is aot_eager: whether a
# call recompiles is decided by dynamo's guards before any backend runs, and inductor would take minutes here.
COUNT_GRAPHS = """
import functools, runpy, sys
import torch
from torch._dynamo.utils import counters
from torch.optim.optimizer import register_optimizer_step_pre_hook
torch.compile = functools.partial(torch.compile, backend="aot_eager")
graphs = []
register_optimizer_step_pre_hook(lambda *args: graphs.append(counters["stats"]["unique_graphs"]))
sys.path.insert(0, ".")
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
print("GRAPHS", graphs)
"""


def test_no_recompiles_when_r_changes(data_dir, tmp_path):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    launcher = tmp_path / "count_graphs.py"
    launcher.write_text(COUNT_GRAPHS)
    out_dir = str(tmp_path / "out")
    # r_bar 6 with k 2: the first iteration already has steps with and without gradients
    proc = train(*TINY, f"--data_dir={data_dir}", "--compile=True", "--mean_recurrence=6", "--max_iters=20",
                 "--eval_interval=100", f"--out_dir={out_dir}", launcher=str(launcher))
    graphs = eval(proc.stdout.split("GRAPHS")[-1])
    iterations = [rec for rec in records(out_dir) if "r" in rec]
    assert iterations[0]["r"] > iterations[0]["n_grad"]  # the first iteration ran steps with and without grad
    assert len({rec["r"] for rec in iterations}) >= 4  # many different r...
    assert len(graphs) == 20 and graphs[0] > 0
    assert graphs[-1] == graphs[0]  # ...and not one graph compiled after the first iteration


@pytest.mark.parametrize("eval_interval, error", [
    (4, "error: loss nan at iteration 5; stopped before the update"),
    (1, "error: val loss nan at r_bar at iteration 5; stopped before saving")])
def test_nan_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, eval_interval, error):
    """A diverged run stops before its update, and before an evaluation's checkpoint could replace the good one."""
    common = [*TINY, f"--data_dir={data_dir}", f"--eval_interval={eval_interval}", f"--out_dir={tmp_path}"]
    train(*common, "--max_iters=4")
    # resume with an absurd learning rate: the first update blows the weights up, the next loss is nan
    proc = train(*common, "--max_iters=8", "--init_from=resume", "--learning_rate=1e30", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(error), proc.stderr
    assert "Traceback" not in proc.stderr
    assert torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=True)["iter_num"] == 4


def test_cpu_threads_default_to_half_the_cores(data_dir, tmp_path):
    """Two compute threads on a 2-core machine with one core busy stall each other for minutes; half the cores (or
    OMP_NUM_THREADS, or --num_threads) leaves room for whatever else runs."""
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    cases = [({}, [], max(1, os.cpu_count() // 2)), ({"OMP_NUM_THREADS": "1"}, [], 1), ({}, ["--num_threads=3"], 3)]
    procs = [subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", "--max_iters=1",
                               f"--out_dir={tmp_path / str(i)}", *args], cwd=REPO, env={**env, **extra_env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (extra_env, args, _) in enumerate(cases)]  # all at once: each spends most of its time importing
    for proc, (_, _, threads) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert f"({threads} CPU threads each)" in stdout
