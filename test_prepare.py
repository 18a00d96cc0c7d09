"""
Tests for prepare_data.py: the files decode back to the text, the output is deterministic, and bad input stops
with one line. The text is generated here (a play-like script of about 50 KB), so nothing is downloaded.

    python -m pytest -q test_prepare.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import play_text

REPO = os.path.dirname(os.path.abspath(__file__))


def prepare(*args):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(play_text())
    return path


def read_split(out_dir, split):
    return np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)


def test_char_level_round_trip_and_determinism(text_file, tmp_path):
    for run in ("a", "b"):
        proc = prepare("shakespeare_char", f"--input={text_file}", f"--out_dir={tmp_path / run}")
        assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    text = text_file.read_text()
    assert meta["tokenizer"] == "char" and meta["chars"] == "".join(sorted(set(text)))
    assert meta["vocab_size"] == len(meta["chars"])
    train, val = read_split(tmp_path / "a", "train"), read_split(tmp_path / "a", "val")
    assert len(val) == len(text) - int(len(text) * 0.9)  # the last 10% validates
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == text
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_rewrite_takes_the_old_meta_away_first(tmp_path):
    """meta.json describes the files written with it: a rerun into the folder removes it before its first file, so
    one that stops half way leaves no meta.json (a one-line "no meta.json" later), never the old one over new files."""
    from corpora import write_split
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 3, "chars": "abc"}))
    write_split(str(tmp_path), "train", [0, 1, 2, 1], 3)
    assert not (tmp_path / "meta.json").exists() and len(read_split(tmp_path, "train")) == 4


def test_bpe_round_trip(text_file, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    proc = prepare("shakespeare", f"--input={text_file}", f"--out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "meta.json").read_text()) == {"tokenizer": "r50k_base", "vocab_size": 50257}
    enc = tiktoken.get_encoding("r50k_base")
    text = text_file.read_text()
    assert enc.decode(read_split(tmp_path, "train").tolist()) + enc.decode(read_split(tmp_path, "val").tolist()) == text


def test_default_out_dir_is_next_to_the_script(text_file, tmp_path):
    """Run a copy of the script from another directory: the files land in data/<dataset>/ beside the script."""
    script_dir, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    script_dir.mkdir()
    cwd.mkdir()
    for name in ("prepare_data.py", "configurator.py", "common.py", "corpora.py"):
        (script_dir / name).write_text(open(os.path.join(REPO, name)).read())
    proc = subprocess.run([sys.executable, str(script_dir / "prepare_data.py"), "shakespeare_char",
                           f"--input={text_file}"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (script_dir / "data" / "shakespeare_char" / "meta.json").is_file()
    assert not (cwd / "data").exists()


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "huge_vocab.txt").write_text("".join(chr(0x20000 + i) for i in range(70_000)) * 2)
    cases = {
        "unknown dataset 'nope'": ["nope"],
        "name a dataset first": [],
        "is not a file": ["shakespeare_char", f"--input={tmp_path / 'missing.txt'}", f"--out_dir={tmp_path / 'out'}"],
        "is empty": ["shakespeare_char", f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'out'}"],
        "does not fit in uint16": ["shakespeare_char", f"--input={tmp_path / 'huge_vocab.txt'}",
                                   f"--out_dir={tmp_path / 'out'}"],
        "unknown setting --bogus": ["shakespeare_char", "--bogus=1"],
    }
    for expected, args in cases.items():
        proc = prepare(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error:") and expected in lines[0], proc.stderr


def test_no_file_reads_data_from_outside_the_repository():
    """Users' clones have nothing beside them: no script, config or test may read data from a folder outside the
    repository (tiktoken's optional offline cache, in conftest.py, is the one exception)."""
    outside = ["shared/" + "data", "shared/" + "spec"]  # written in two pieces, so this file does not name them
    files = [name for name in os.listdir(REPO) if name.endswith((".py", ".md", ".txt"))]
    files += [os.path.join("config", name) for name in os.listdir(os.path.join(REPO, "config"))]
    files += [os.path.join(".ci", name) for name in os.listdir(os.path.join(REPO, ".ci"))]
    for name in files:
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            assert not any(folder in f.read() for folder in outside), f"{name} names a folder outside the repository"
