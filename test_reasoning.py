"""
Tests for the reasoning data (prepare_data.py reasoning / problems) and for test-time scaling itself:
a tiny model trained for well under a minute must answer more problems at its mean r_bar than at r=1,
so a change that makes the model ignore its recurrence (or breaks aligned targets) fails here.
Run: python -m pytest -q test_reasoning.py
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the tests may share a small machine


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def read_split(out_dir, name):
    return np.fromfile(os.path.join(out_dir, name), dtype=np.uint16)


def test_problems_file_gives_aligned_targets(tmp_path):
    # two problems: a dense one (a label on every character) and one answer at a placeholder
    problems = tmp_path / "problems.txt"
    # (saved with the byte-order mark some Windows editors write: it is not part of the first line)
    problems.write_bytes("\ufeff# a comment\n2\tab\tba\n\n5\t1+2=__\t03\n9\txyz\tz\n".encode())
    out = tmp_path / "data"
    result = run("prepare_data.py", "problems", f"--input={problems}", f"--out_dir={out}", "--val_fraction=0",
                 "--train_max_difficulty=5")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    chars, length = meta["chars"], meta["row_len"]
    assert length == 7  # the longest problem (6 characters) plus its "\n"
    decode = lambda ids: "".join(chars[i] for i in ids)
    x, y = read_split(out, "train.bin"), read_split(out, "train_targets.bin")
    assert len(x) == len(y) and len(x) % length == 0
    labels = "".join("." if t == 65535 else chars[t] for t in y)
    rows = {(decode(x[i : i + length]), labels[i : i + length]) for i in range(0, len(x), length)}
    # packed whole into rows, padded with "\n"; the answer labels the problem's last characters
    assert rows == {("\nab\n\n\n\n", ".ba...."), ("\n1+2=__", ".....03")}
    # difficulty 9 > train_max_difficulty: in val only, with its difficulty on the labelled position
    assert decode(read_split(out, "val.bin")) == "\nxyz\n\n\n"
    assert read_split(out, "val_difficulty.bin").tolist() == [0, 0, 0, 9, 0, 0, 0]
    # any difficulty below 65,536 is the user's (the limit of 4 x train_max_difficulty is reasoning's generated val)
    problems.write_text("2\tab\tba\n30000\txyz\tz\n")
    result = run("prepare_data.py", "problems", f"--input={problems}", f"--out_dir={tmp_path / 'hard'}",
                 "--val_fraction=0", "--train_max_difficulty=20000")
    assert result.returncode == 0, result.stderr
    assert read_split(tmp_path / "hard", "val_difficulty.bin").max() == 30000


def test_problems_file_errors_are_one_line(tmp_path):
    for text in ("3\tabc\n", "3\tab\tabc\n", "x\tab\tb\n", "\u00b2\tab\tb\n"):  # (a superscript two)
        problems = tmp_path / "bad.txt"
        problems.write_text(text)
        result = run("prepare_data.py", "problems", f"--input={problems}", f"--out_dir={tmp_path / 'data'}")
        assert result.returncode != 0
        assert result.stderr.startswith("error: ") and "line 1" in result.stderr
        assert "Traceback" not in result.stderr
    # 65,535 characters and the row's "\n": the last id would be the "no loss" marker, and its labels lost
    problem = "".join(chr(0x10000 + i) for i in range(65535))
    problems.write_text(f"1\t{problem}\t{problem[-1]}\n9\t{problem}\t{problem[-1]}\n")
    result = run("prepare_data.py", "problems", f"--input={problems}", f"--out_dir={tmp_path / 'data'}",
                 "--val_fraction=0")
    assert result.stderr.strip() == "error: the problems use 65,536 distinct characters; at most 65,535 fit"


def test_reasoning_labels_are_the_running_arrangement(tmp_path):
    out = tmp_path / "data"
    result = run("prepare_data.py", "reasoning", f"--out_dir={out}", "--num_train_problems=50",
                 "--val_problems_per_difficulty=2", "--train_max_difficulty=4")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    chars = meta["chars"]
    assert meta["row_len"] == 17  # the hardest val problem: 4 x 4 moves, plus "\n"
    x, y = read_split(out, "val.bin"), read_split(out, "val_targets.bin")
    difficulty = read_split(out, "val_difficulty.bin")
    assert sorted(set(difficulty.tolist()) - {0}) == [1, 2, 3, 4, 6, 8, 12, 16]
    # replay every move on three cups, independently of prepare_data.py's code
    moves = list(itertools.permutations(range(3)))  # digit i is the i-th rearrangement in this order
    cups, checked = None, 0
    for token, target, d in zip(x, y, difficulty):
        if chars[token] == "\n":
            cups = [0, 1, 2]
            assert target == 65535 and d == 0  # separators carry no loss
            continue
        cups = [cups[j] for j in moves[int(chars[token])]]  # place j takes the cup that was at move[j]
        arrangement = moves.index(tuple(cups))
        assert chars[target] == str(arrangement) and d > 0
        checked += 1
    assert checked == 2 * sum([1, 2, 3, 4, 6, 8, 12, 16])
    # one trained move: 1.5 x 1 rounds to 1, a trained difficulty, which was then validated twice as often
    result = run("prepare_data.py", "reasoning", f"--out_dir={tmp_path / 'one'}", "--num_train_problems=50",
                 "--val_problems_per_difficulty=2", "--train_max_difficulty=1")
    assert result.returncode == 0, result.stderr
    difficulty = read_split(tmp_path / "one", "val_difficulty.bin")
    assert {d: int((difficulty == d).sum()) // d for d in set(difficulty.tolist()) - {0}} == {1: 2, 2: 2, 3: 2, 4: 2}


def test_more_steps_help_after_a_short_training(cups):
    """conftest.cups: moves 1-4, r_bar 4, 500 iterations; then exact-match accuracy at r = 1 and r = 4.

    Seeds 1, 2, 3 and 1337 gave 0.62-0.67 at r=1 and 1.00 at r=4 over difficulties 1-4, and 0.06-0.12 vs 1.00 on
    4 moves; a model that ignores its recurrence scores the same at both r."""
    result = run("eval.py", f"--out_dir={cups.out}", "--r=[1,4]", "--plot=False")
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((cups.out / "accuracy.json").read_text())["accuracy"]
    trained = [str(d) for d in (1, 2, 3, 4)]
    at = lambda r: np.mean([accuracy[d][str(r)] for d in trained])  # over the trained difficulties
    assert at(4) > at(1) + 0.25, accuracy
    assert accuracy["4"]["4"] > accuracy["4"]["1"] + 0.5, accuracy  # the hardest trained problems gain most
