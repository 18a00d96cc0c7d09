"""
Tests for latents.py on tiny checkpoints built here (random weights: what is checked is the recording, the
bookkeeping and the errors, not what a trained model learns). About 15 s on one thread.
Run: python -m pytest -q test_latents.py
"""

import contextlib
import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from checkpoints import load_checkpoint
from decode import EXIT_THRESHOLDS
from model import RecurrentGPT, config_from_preset

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the tests may share a small machine
torch.set_num_threads(1)


def run(*args):
    """latents.py run in this process, as `python latents.py args` would (torch is imported once, not per run: each
    subprocess would cost 2 s). Returns its exit message (None when it ran through) and what it printed."""
    argv, printed = sys.argv, io.StringIO()
    sys.argv = ["latents.py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(os.path.join(ROOT, "latents.py"), run_name="__main__")
        message = None
    except SystemExit as stop:  # configurator.fail: sys.exit("error: ...")
        message = str(stop.code)
    finally:
        sys.argv = argv
    return message, printed.getvalue()


def one_line_error(result, words):
    message, _ = result
    assert message is not None and message.startswith("error: ") and "\n" not in message.strip(), message
    assert words in message, message


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # latents.py then leaves this process's thread count alone


def save_checkpoint(out, meta, train_config, **overrides):
    """out/ckpt.pt as train.py writes it, for a tiny model with random weights."""
    torch.manual_seed(0)
    config = config_from_preset("tiny", vocab_size=meta["vocab_size"], **overrides)
    os.makedirs(out, exist_ok=True)
    torch.save({"model": RecurrentGPT(config).state_dict(), "model_config": asdict(config), "meta": meta,
                "config": train_config, "iter_num": 0, "best_val_loss": 0.0}, os.path.join(out, "ckpt.pt"))


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory):
    """A tiny three-cups dataset (1-4 moves in train; 1-4, 6, 8, 12, 16 in val, rows of 17) and a checkpoint."""
    tmp = tmp_path_factory.mktemp("latents")
    data, out = tmp / "data", tmp / "out"
    result = subprocess.run([sys.executable, "prepare_data.py", "reasoning", f"--out_dir={data}",
                             "--train_max_difficulty=4", "--num_train_problems=50", "--val_problems_per_difficulty=3"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    meta = json.loads((data / "meta.json").read_text())
    save_checkpoint(out, meta, {"data_dir": str(data), "dataset": "reasoning", "block_size": meta["row_len"]},
                    block_size=meta["row_len"])
    return data, out


def test_reasoning_run_records_the_loop_and_the_think_meter(reasoning):
    data, out = reasoning
    r, seed, batch_size = 6, 7, 1
    error, printed = run(f"--out_dir={out}", f"--r={r}", f"--seed={seed}", f"--batch_size={batch_size}",
                         f"--plot_dir={out / 'pictures'}")
    assert error is None, error
    model, checkpoint = load_checkpoint(str(out))
    meta = checkpoint["meta"]

    # 1. the prompt: the hardest example problem after "\n"; s_0 ... s_r of every position
    saved = torch.load(out / "latents.pt", weights_only=True)
    problem = meta["examples"][-1][1]
    idx = torch.tensor([[meta["chars"].index(c) for c in "\n" + problem]])
    T, h = idx.size(1), model.config.n_embd
    assert saved["tokens"] == idx[0].tolist()
    assert saved["states"].shape == (r + 1, T, h) and saved["predictions"].shape == (r + 1, T)
    # s_0 is the model's noise start from a generator seeded with --seed, and the loop from it gives every s_i
    with torch.no_grad():
        rope = model.rope[:T]
        e = model.embed(idx, rope)
        s0 = model.initial_state(e.shape, 1.0, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(saved["states"][0], s0[0], rtol=0, atol=0)
        for i, state in enumerate(model.iterate(s0, e, rope, r), start=1):
            torch.testing.assert_close(saved["states"][i], state[0], rtol=1e-6, atol=1e-6)
        # ... and model(...) with the same seed ends where the recording does
        logits, _ = model(idx, num_steps=r, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(model.predict(saved["states"][r][None], rope), logits, rtol=1e-5, atol=1e-5)
        assert saved["predictions"][r].tolist() == logits[0].argmax(-1).tolist()

    # the prompt's report: where each position's argmax settles (the first step from which it stays the final one,
    # not before step 1) and its distance to the final state, from the recording itself
    report = json.loads((out / "latents.json").read_text())
    preds = saved["predictions"]
    settle = [max(1, min(i for i in range(r + 1) if (preds[i:, t] == preds[r, t]).all())) for t in range(T)]
    assert report["prompt"]["settle"] == settle
    distance = (saved["states"] - saved["states"][r]).norm(dim=-1).T  # (T, r + 1)
    np.testing.assert_allclose(report["prompt"]["distance"], distance.numpy(), rtol=1e-5, atol=1e-6)

    # 4. the think-meter covers every labelled val position; moves so far = index within its problem + 1
    targets = np.fromfile(data / "val_targets.bin", dtype=np.uint16)
    meter = report["think_meter"]
    moves = np.array(meter["moves"])
    assert len(moves) == (targets != 65535).sum()
    assert sorted(set(moves.tolist())) == list(range(1, 17)) and (moves == 16).sum() == 3  # three 16-move problems
    assert all(1 <= s <= r for s in meter["argmax-settle"])

    # the exit rules' meters: decode.py's rules at their defaults, each exit step within 1 .. r
    names = {f"{name} {EXIT_THRESHOLDS[name]:g}" for name in ("kl", "latent-diff", "confident-run")}
    assert set(meter["spearman"]) == {"argmax-settle"} | names
    for name, correlation in meter["spearman"].items():  # Pearson's on ranks, ties sharing their mean rank
        values = np.array(meter[name])
        if len(set(values.tolist())) > 1:
            rank = lambda a: np.array([(a < v).sum() + ((a == v).sum() + 1) / 2 for v in a])
            assert correlation == pytest.approx(np.corrcoef(rank(moves), rank(values))[0, 1], abs=1e-9)
    assert all(1 <= s <= r for name in names for s in meter[name])

    # the pictures, when matplotlib is installed (CI installs it; the next test checks the hint without it)
    pictures = ["trajectories", "distance", "think_meter"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert "no pictures" not in printed
        for name in pictures:
            assert (out / "pictures" / f"latents_{name}.png").stat().st_size > 1000


CHARS = "\n !',.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def test_text_checkpoint_draws_but_has_no_think_meter(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS},
                    {"data_dir": "", "dataset": "shakespeare_char", "block_size": 64})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: tables only, and a hint
    error, printed = run(f"--out_dir={tmp_path}", "--r=5", "--start=To be, or not", "--tokens=[0,-1]")
    assert error is None, error
    assert "no pictures: pip install matplotlib" in printed and not list(tmp_path.glob("*.png"))
    saved = torch.load(tmp_path / "latents.pt", weights_only=True)
    assert saved["states"].shape == (6, len("To be, or not"), 64)
    assert "think_meter" not in json.loads((tmp_path / "latents.json").read_text())
    one_line_error(run(f"--out_dir={tmp_path}", "--start=To be", "--think_meter"), "the think-meter needs a reasoning")
    one_line_error(run(f"--out_dir={tmp_path}"), "give a prompt to look at with --start")
    one_line_error(run(f"--out_dir={tmp_path}", "--start=<tag>"), "characters the model's vocabulary lacks")
    one_line_error(run(f"--out_dir={tmp_path}", "--start=To be", "--tokens=[5]"), "--tokens must be positions")


def test_bad_input_is_a_one_line_error(tmp_path, reasoning):
    _, out = reasoning
    # once for real, on the command line: one line on stderr, no traceback
    result = subprocess.run([sys.executable, "latents.py", f"--out_dir={tmp_path / 'nothing'}"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: no checkpoint at") and result.stderr.count("\n") == 1, result.stderr
    one_line_error(run(f"--out_dir={out}", "--r=0"), "--r must be a whole number")
    one_line_error(run(f"--out_dir={out}", f"--data_dir={tmp_path / 'no-data'}", "--plot=False"), "no meta.json")
    one_line_error(run(f"--out_dir={out}", "--dtype=float16"), "--dtype must be")


def test_released_layout_through_from_pretrained(tmp_path):
    from test_pretrained import reference_tensors, tiny, write_checkpoint, write_tiny_tokenizer
    write_checkpoint(tmp_path / "huginn", tiny(), reference_tensors(tiny()))
    write_tiny_tokenizer(tmp_path / "huginn")
    error, _ = run(f"--init_from={tmp_path / 'huginn'}", f"--out_dir={tmp_path / 'out'}", "--start=hi there", "--r=3",
                   "--plot=False")
    assert error is None, error
    saved = torch.load(tmp_path / "out" / "latents.pt", weights_only=True)
    assert saved["states"].shape == (4, 1 + len("hi there"), 32)  # <|begin_text|> leads the text, as in sample.py
    one_line_error(run(f"--init_from={tmp_path / 'huginn'}", "--start=hi", "--think_meter"), "a text model")
    one_line_error(run(f"--init_from={tmp_path / 'nowhere'}"), "no such folder")
