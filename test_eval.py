"""
Tests for eval.py, the test-time scaling experiment: val loss by r equals train.py's evals, exact-match accuracy by
difficulty and r recomputed by hand, the example problems and one's own answered, the optional picture. CPU only.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from checkpoints import get_tokenizer, load_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--n_embd=32", "--n_head=2", "--n_layers_prelude=1", "--n_layers_core=1", "--n_layers_coda=1",
        "--intermediate_size=64", "--mean_recurrence=4", "--backprop_depth=2", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu", "--compile=False", "--log_interval=1",
        "--warmup_iters=5", "--num_threads=1"]


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def make_prefix_sum_data(path, rng, n_rows):
    """Aligned-target data in prepare_data.py's format: rows of 16 tokens holding problems "digits \\n digits ...";
    the label at each digit is the running sum mod 10 of its problem so far; the difficulty is the problem's
    length; separators carry no label."""
    row_len, sep = 16, 10
    for split in ("train", "val"):
        x, y, d = [], [], []
        for _ in range(n_rows):
            row_x, row_y, row_d = [], [], []
            while len(row_x) < row_len:
                n = int(rng.integers(1, 6))
                digits = rng.integers(0, 10, n)
                row_x += [*digits.tolist(), sep]
                row_y += [*(np.cumsum(digits) % 10).tolist(), 65535]
                row_d += [n] * n + [0]
            x += row_x[:row_len]
            y += row_y[:row_len]
            d += row_d[:row_len]
        np.array(x, dtype=np.uint16).tofile(path / f"{split}.bin")
        np.array(y, dtype=np.uint16).tofile(path / f"{split}_targets.bin")
        if split == "val":
            np.array(d, dtype=np.uint16).tofile(path / "val_difficulty.bin")
    (path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 11, "chars": "0123456789\n",
                                                "row_len": row_len, "train_max_difficulty": 3,
                                                "examples": [[4, "1234", "1360"]]}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 30 iterations on the prefix-sum problems."""
    tmp = tmp_path_factory.mktemp("eval")
    data, out_dir = tmp / "data", tmp / "out"
    data.mkdir()
    make_prefix_sum_data(data, np.random.default_rng(0), n_rows=150)
    proc = run("train.py", *TINY, f"--data_dir={data}", "--block_size=16", f"--out_dir={out_dir}", "--eval_interval=30",
               "--max_iters=30", "--learning_rate=3e-3", "--eval_r=[1,4]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out_dir


def test_val_loss_by_r_matches_train_logs(trained):
    """eval.py scores the same fixed blocks with the same noise starts as train.py's evals: the same numbers."""
    data, out_dir = trained
    proc = run("eval.py", f"--out_dir={out_dir}", "--r=[1,4]", "--plot=False")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out_dir / "accuracy.json").read_text())
    logged = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    final = [rec["val_loss"] for rec in logged if rec.get("iter") == 30 and "val_loss" in rec][0]
    for r in ("1", "4"):
        assert result["val_loss"][r] == pytest.approx(final[r], abs=1e-6)


def test_accuracy_by_difficulty_and_r(trained):
    data, out_dir = trained
    # the zero start state, so the test can recompute every number
    proc = run("eval.py", f"--out_dir={out_dir}", "--init_scale=0", "--r=[1,2,8]", "--plot=False")
    assert proc.returncode == 0, proc.stderr
    assert "exact-match accuracy" in proc.stdout and "1234  (difficulty 4, answer 1360)" in proc.stdout
    result = json.loads((out_dir / "accuracy.json").read_text())
    assert result["r"] == [1, 2, 8]

    # recompute: every problem by walking the rows, solved when all its positions are predicted right
    model, _ = load_checkpoint(str(out_dir))
    x = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64)).view(-1, 16)
    y = np.fromfile(data / "val_targets.bin", dtype=np.uint16).reshape(-1, 16)
    d = np.fromfile(data / "val_difficulty.bin", dtype=np.uint16).reshape(-1, 16)
    for r in (1, 2, 8):
        with torch.no_grad():
            pred = model(x, num_steps=r, init_scale=0.0)[0].argmax(-1).numpy()
        solved = {}  # difficulty -> list of 0/1
        for row in range(len(y)):
            t = 0
            while t < 16:
                if y[row, t] == 65535:
                    t += 1
                    continue
                end = t
                while end < 16 and y[row, end] != 65535 and d[row, end] == d[row, t]:
                    end += 1
                solved.setdefault(str(d[row, t]), []).append(int((pred[row, t:end] == y[row, t:end]).all()))
                t = end
        everything = sum(solved.values(), [])
        assert result["problems"]["all"] == len(everything)
        assert result["accuracy"]["all"][str(r)] == pytest.approx(np.mean(everything), abs=1e-12)
        for difficulty, values in solved.items():
            assert result["problems"][difficulty] == len(values)
            assert result["accuracy"][difficulty][str(r)] == pytest.approx(np.mean(values), abs=1e-12)
    assert set(result["problems"]) == {"1", "2", "3", "4", "5", "all"}


def test_int8_beside_float(trained):
    """--quantize=int8 writes its own accuracy_int8.json (the float results stay), says how often int8's top-1 is
    float32's and how its weights were chosen, and counts the model's parameters as the float one has them."""
    data, out_dir = trained
    assert run("eval.py", f"--out_dir={out_dir}", "--r=[1,4]", "--plot=False").returncode == 0
    before = (out_dir / "accuracy.json").read_text()
    proc = run("eval.py", f"--out_dir={out_dir}", "--r=[1,4]", "--plot=False", "--quantize=int8")
    assert proc.returncode == 0, proc.stderr
    float_params = load_checkpoint(str(out_dir))[0].get_num_params()
    assert f"{float_params / 1e6:.2f}M parameters" in proc.stdout and float_params > 0
    result = json.loads((out_dir / "accuracy_int8.json").read_text())
    assert result["quantize"] == "int8" and result["calibration_tokens"] == 8192  # GPTQ, on the train split
    assert "int8 (GPTQ, calibration_tokens=8192): top-1 agreement" in proc.stdout
    float_result = json.loads(before)
    for r in ("1", "4"):  # a tiny model with int8 weights: mostly the same answers, and really other weights
        assert 0.8 <= result["agreement"][r] <= 1.0 and result["val_loss"][r] != float_result["val_loss"][r]
        assert result["val_loss"][r] == pytest.approx(float_result["val_loss"][r], abs=0.05)
    assert (out_dir / "accuracy.json").read_text() == before


def test_int8_yardstick(cups):
    """Beside int8's agreement eval.py prints float32's with itself from another draw of the noise start s_0: on a
    model whose depth matters, at r = 1 the noise decides some predictions (a key shared by both draws would give
    1.0), and at the zero state none."""
    agreement = {}
    for init_scale in (1, 0):
        proc = run("eval.py", f"--out_dir={cups.out}", "--r=[1]", "--plot=False", "--quantize=int8",
                   f"--init_scale={init_scale}")
        assert proc.returncode == 0, proc.stderr
        agreement[init_scale] = json.loads((cups.out / "accuracy_int8.json").read_text())["noise_agreement"]["1"]
    print(agreement)
    assert agreement[1] < 0.99 and agreement[0] == 1.0


def test_own_problem_and_the_picture(trained, tmp_path):
    """--problem answers a problem of one's own at each r, and only that (it ran the whole evaluation and wrote its
    table and picture over the last ones); the picture is drawn when matplotlib is installed, and without it eval.py
    says how to get it and still finishes."""
    data, out_dir = trained
    for name in ("accuracy.json", "accuracy.png"):
        (out_dir / name).unlink(missing_ok=True)
    proc = run("eval.py", f"--out_dir={out_dir}", "--r=[1,3]", "--problem", "98", "--init_scale=0")
    assert proc.returncode == 0, proc.stderr
    assert "val loss" not in proc.stdout and not (out_dir / "accuracy.json").exists()
    lines = proc.stdout.splitlines()
    at = lines.index("98")
    model, checkpoint = load_checkpoint(str(out_dir))
    encode, decode = get_tokenizer(checkpoint["meta"])
    for i, num_steps in enumerate((1, 3)):  # the model's own argmax after each character, "\n" leading as in training
        with torch.no_grad():
            logits = model(torch.tensor([encode("\n98")]), num_steps=num_steps, init_scale=0)[0]
        assert lines[at + 1 + i].split() == [f"r={num_steps}", decode(logits[0, 1:].argmax(-1).tolist())]
    pytest.importorskip("matplotlib", reason="the picture needs matplotlib (pip install matplotlib)")
    proc = run("eval.py", f"--out_dir={out_dir}", "--r=[1,3]", "--init_scale=0")
    assert (out_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out_dir / "accuracy.json").read_text())  # what it was measured with, recorded
    assert result["init_scale"] == 0 and result["data_dir"] == str(data) and result["r"] == [1, 3]
    # without matplotlib (a stand-in package that fails to import): a one-line hint, and the figures all the same
    fake = tmp_path / "no-matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    (out_dir / "accuracy.png").unlink()
    proc = subprocess.run([sys.executable, "eval.py", f"--out_dir={out_dir}", "--r=[1,3]"], cwd=REPO, text=True,
                          env={**ENV, "PYTHONPATH": str(fake.parent)}, capture_output=True, timeout=300)
    assert proc.returncode == 0 and "pip install matplotlib" in proc.stdout and not (out_dir / "accuracy.png").exists()


def test_text_checkpoint_gets_val_loss_only(tmp_path):
    """A checkpoint of text (no targets): eval.py reports val loss by r only, train.py's last evaluation's from the
    zero state it trained with, and another from the noise start; a missing checkpoint is one line."""
    data = tmp_path / "data"
    data.mkdir()
    make_prefix_sum_data(data, np.random.default_rng(1), n_rows=40)
    for name in ("train_targets.bin", "val_targets.bin", "val_difficulty.bin"):
        os.remove(data / name)
    meta = json.loads((data / "meta.json").read_text())
    del meta["row_len"]
    (data / "meta.json").write_text(json.dumps(meta))
    out_dir, noise_dir = tmp_path / "out", tmp_path / "out-noise"
    # two at a time, one thread each: the missing checkpoint beside training, then the evaluation from the noise
    # start (in a copy of the run: its own eval.json) beside the plain one
    with ThreadPoolExecutor(1) as pool:
        missing = pool.submit(run, "eval.py", f"--out_dir={tmp_path / 'nowhere'}")
        assert run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={out_dir}", "--block_size=16",
                   "--eval_interval=4", "--max_iters=4", "--init_scale=0", "--eval_r=[1,2]").returncode == 0
        missing = missing.result()
        shutil.copytree(out_dir, noise_dir)
        noise = pool.submit(run, "eval.py", f"--out_dir={noise_dir}", "--r=[1,2]", "--init_scale=1")
        proc = run("eval.py", f"--out_dir={out_dir}", "--r=[1,2]")
        noise = noise.result()
    assert proc.returncode == 0 and "exact-match" not in proc.stdout, proc.stderr
    val_loss = json.loads((out_dir / "eval.json").read_text())["val_loss"]
    assert set(val_loss) == {"1", "2"}
    # trained from the zero state (--init_scale=0): train.py's evals and eval.py's default use it too
    logged = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    final = [rec["val_loss"] for rec in logged if rec.get("iter") == 4 and "val_loss" in rec][0]
    assert val_loss == pytest.approx({r: final[r] for r in ("1", "2")}, abs=1e-6)
    assert noise.returncode == 0
    assert json.loads((noise_dir / "eval.json").read_text())["val_loss"]["1"] != pytest.approx(final["1"], abs=1e-3)
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error: no checkpoint at")
