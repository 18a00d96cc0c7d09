"""Shared by every test file: tiktoken reads its r50k_base vocabulary from ../shared/tiktoken_cache when that folder
is there (CI and offline machines); elsewhere it downloads it once, as for any user. And play_text, the tests' own
corpus: no test reads a data file from outside the repository."""

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)  # subprocesses of the tests inherit it


def play_text(n_chars=50_000, seed=0):
    """English-like text in the shape of a play: speakers, lines of varied words and punctuation, some numbers.
    Deterministic (a seeded generator), so every run and every machine tests the same bytes."""
    rng = random.Random(seed)
    speakers = ["KING HENRY", "MARGARET", "First Citizen", "O'NEILL", "Lady Anne", "GLOUCESTER", "Nurse"]
    words = ("the of and to my a that in is not you it with me for be his your this but he have as so will what "
             "her thou by all shall do no if are we thee our on now lord good sir come more they love how would "
             "heaven night day well death king queen blood heart eyes time world honour fair sweet gentle "
             "speak hear tell know stay go away again never ever upon yet though while when where why whence "
             "Rome London York Warwick Friday September quickly jealous zealous vex quiz jump").split()
    ends = [".", ".", ".", "!", "?", ";", ":", ",", " --", "..."]
    out, size = [], 0
    while size < n_chars:
        lines = [rng.choice(speakers) + ":"]
        for _ in range(rng.randint(1, 4)):
            line = [rng.choice(words) for _ in range(rng.randint(3, 11))]
            if rng.random() < 0.1:
                line.insert(rng.randrange(len(line)), str(rng.randint(2, 1999)))
            if rng.random() < 0.15:
                line[0] = "'" + line[0]
                line[-1] += "'"
            line = " ".join(line)
            lines.append(line[0].upper() + line[1:] + rng.choice(ends))
        out.append("\n".join(lines) + "\n\n")
        size += len(out[-1])
    return "".join(out)[:n_chars]


def make_cups(tmp):
    """A small three-cups checkpoint in tmp: moves 1-4, r_bar 4, 500 iterations (~20 s on one thread). .data is the
    data folder (with its lm-eval tasks in .data/harness), .out the checkpoint's out_dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = os.path.dirname(os.path.abspath(__file__))
    for args in (["prepare_data.py", "reasoning", f"--out_dir={tmp / 'data'}", "--train_max_difficulty=4",
                  "--num_train_problems=20000", "--val_problems_per_difficulty=50"],
                 ["train.py", "config/train_reasoning_cpu.py", f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'out'}",
                  "--block_size=17", "--mean_recurrence=4", "--backprop_depth=2", "--max_iters=500",
                  "--warmup_iters=30", "--eval_interval=500", "--eval_iters=2"]):
        result = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    return SimpleNamespace(data=tmp / "data", out=tmp / "out")


@pytest.fixture(scope="session", autouse=True)
def cups_in_the_background(request, tmp_path_factory):
    """When a test of this session needs the cups checkpoint, it is made from the start, on the second core, while
    the tests before the first of those run (one thread each): a future of make_cups, or None."""
    if not any("cups" in item.fixturenames for item in request.session.items):
        yield None
        return
    with ThreadPoolExecutor(1) as pool:  # (leaving waits for a build still running)
        yield pool.submit(make_cups, tmp_path_factory.mktemp("cups"))


@pytest.fixture(scope="session")
def cups(cups_in_the_background):
    """A small three-cups checkpoint (make_cups), made once for every test file that needs a model whose depth
    matters."""
    return cups_in_the_background.result()
