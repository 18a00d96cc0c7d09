"""Bad input never costs work: every script, given a bad flag, file or folder, stops at once with one line that says
what to do, and no run loses a checkpoint. The table below runs each script in this process (runpy, so torch is
imported once: a case takes milliseconds); the cases that need a second process (locks, kill -9, a full disk) run
train.py as one. CPU only."""

import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import play_text
from model import RecurrentGPT, config_from_preset
from test_pretrained import tiny as tiny_release

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--n_embd=32", "--n_head=2", "--n_layers_prelude=1", "--n_layers_core=1", "--n_layers_coda=1",
        "--intermediate_size=64", "--mean_recurrence=4", "--backprop_depth=2", "--batch_size=4", "--block_size=32",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu", "--compile=False", "--log_interval=1",
        "--warmup_iters=5", "--learning_rate=1e-3", "--num_threads=1"]


def run_script(script, *args):
    """Run a script in this process as `python script args`; its exit: None if it finished, else the SystemExit's
    code (a string "error: ..." for a one-line error). Any other exception is a traceback: it fails the test."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        sys.argv = argv
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the cases point at: a character dataset, three-cups rows, a tiny checkpoint of each kind, and
    broken files of every sort."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "play.txt").write_text(play_text(20_000))
    assert run_script("prepare_data.py", "shakespeare_char", f"--input={tmp / 'play.txt'}",
                      f"--out_dir={tmp / 'char'}") is None
    (tmp / "lower.txt").write_text(play_text(20_000).lower())  # another vocabulary
    assert run_script("prepare_data.py", "shakespeare_char", f"--input={tmp / 'lower.txt'}",
                      f"--out_dir={tmp / 'char-lower'}") is None
    assert run_script("prepare_data.py", "reasoning", f"--out_dir={tmp / 'rows'}", "--num_train_problems=300",
                      "--val_problems_per_difficulty=2", "--train_max_difficulty=4") is None
    for kind, data in (("text", "char"), ("cups", "rows")):  # a checkpoint in train.py's format, untrained
        meta = json.loads((tmp / data / "meta.json").read_text())
        block_size = meta.get("row_len", 32)
        torch.manual_seed(0)
        model = RecurrentGPT(config_from_preset("tiny", vocab_size=meta["vocab_size"], block_size=block_size,
                                                n_layers_core=2))
        (tmp / kind).mkdir()
        torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "meta": meta,
                    "config": {"dataset": data, "data_dir": str(tmp / data), "block_size": block_size,
                               "batch_size": 4, "eval_iters": 2, "seed": 0},
                    "iter_num": 10, "best_val_loss": 1.0, "optimizer": {}}, tmp / kind / "ckpt.pt")
    for name, content in {"empty": b"", "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)),
                          "zip": b"PK\x03\x04 not really a zip file"}.items():
        (tmp / f"ckpt-{name}").mkdir()
        (tmp / f"ckpt-{name}" / "ckpt.pt").write_bytes(content)
    checkpoint = torch.load(tmp / "text" / "ckpt.pt", weights_only=False)  # whose data is gone
    checkpoint["config"]["data_dir"] = str(tmp / "gone")
    (tmp / "text-nodata").mkdir()
    torch.save(checkpoint, tmp / "text-nodata" / "ckpt.pt")
    (tmp / "gate-broken").mkdir()  # a good checkpoint beside a damaged exit gate
    (tmp / "gate-broken" / "ckpt.pt").write_bytes((tmp / "text" / "ckpt.pt").read_bytes())
    (tmp / "gate-broken" / "exit_gate.pt").write_bytes(b"PK\x03\x04 not really a zip file")
    (tmp / "latin1.txt").write_bytes("To be, or not to be: caf\xe9".encode("latin-1"))
    (tmp / "bom-latin1.txt").write_bytes(b"\xef\xbb\xbf" + "To be, or not to be: caf\xe9".encode("latin-1"))
    (tmp / "a-file").write_text("not a folder")
    (tmp / "unread-release").mkdir()  # a release whose weights never read: what it cannot run stops before them
    (tmp / "unread-release" / "config.json").write_text(json.dumps(tiny_release()))
    (tmp / "unread-release" / "model.safetensors").write_bytes(b"not read")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "problems-latin1.txt").write_bytes("3\t012\t012\n2\t\xe9\xe9\t01\n".encode("latin-1"))
    broken_data(tmp)
    return tmp


def broken_data(tmp):
    """Copies of the character data, each broken in one way."""
    good = tmp / "char"
    for name, breakage in {
        "odd": lambda d: d.joinpath("train.bin").write_bytes(d.joinpath("train.bin").read_bytes()[:-1]),
        "empty-val": lambda d: d.joinpath("val.bin").write_bytes(b""),
        "bad-meta": lambda d: d.joinpath("meta.json").write_text('{"tokenizer": "char", "vocab'),
        "no-vocab": lambda d: d.joinpath("meta.json").write_text('{"tokenizer": "char"}'),
        "no-chars": lambda d: d.joinpath("meta.json").write_text('{"tokenizer": "char", "vocab_size": 62}'),
        "big-id": lambda d: np.full(100, 60_000, np.uint16).tofile(d / "val.bin"),
    }.items():
        broken = tmp / f"char-{name}"
        broken.mkdir()
        for f in good.iterdir():
            if f.is_file():
                (broken / f.name).write_bytes(f.read_bytes())
        breakage(broken)
    # three-cups rows, each copy broken in one way
    row_len = json.loads((tmp / "rows" / "meta.json").read_text())["row_len"]
    for name, breakage in {
        # no labelled train position (prepare_data.py reasoning --num_train_problems 0, if allowed)
        "unlabelled": lambda d: np.full(len(np.fromfile(d / "train.bin", np.uint16)), 65535, np.uint16).tofile(
            d / "train_targets.bin"),
        "no-difficulty": lambda d: d.joinpath("val_difficulty.bin").unlink(),
        "short-difficulty": lambda d: d.joinpath("val_difficulty.bin").write_bytes(b"\x01\x00" * row_len),
        # rows of another length than meta.json's (a rerun with another --row_len that stopped before its meta.json)
        "cut-rows": lambda d: [d.joinpath(f).write_bytes(d.joinpath(f).read_bytes()[:-2])
                               for f in ("train.bin", "train_targets.bin")],
        "one-val-row": lambda d: [d.joinpath(f).write_bytes(d.joinpath(f).read_bytes()[:2 * row_len])
                                  for f in ("val.bin", "val_targets.bin", "val_difficulty.bin")],
    }.items():
        broken = tmp / f"cups-{name}"
        broken.mkdir()
        for f in (tmp / "rows").iterdir():
            if f.is_file():
                (broken / f.name).write_bytes(f.read_bytes())
        breakage(broken)


# (script, arguments, what the one-line error must say); "{tmp}" is the fixture's folder
CASES = [
    # train.py: settings
    ("train.py", ["--max_iters=-1"], "--max_iters must be a whole number >= 1"),
    ("train.py", ["--n_head=5"], "n_embd (32) must be n_head (5) times an even head size"),
    ("train.py", ["--n_head=32"], "n_embd (32) must be n_head (32) times an even head size"),
    ("train.py", ["--backprop_depth=0"], "backprop_depth must be a whole number >= 1"),
    ("train.py", ["--batch_size=big"], "batch_size expects int"),
    ("train.py", ["--bogus=1"], "unknown setting --bogus"),
    ("train.py", ["--learning_rate=-1"], "--learning_rate must be a number > 0"),
    ("train.py", ["--learning_rate=nan"], "learning_rate expects float"),
    ("train.py", ["--learning_rate=1e400"], "--learning_rate must be a number > 0"),
    ("train.py", ["--min_lr=1"], "--min_lr must be a number >= 0 and <= 0.001"),
    ("train.py", ["--beta2=1.5"], "--beta2 must be a number >= 0 and < 1"),
    ("train.py", ["--grad_clip=-1"], "--grad_clip must be a number >= 0"),
    ("train.py", ["--eval_r=[0]"], "--eval_r must list whole numbers of steps >= 1"),
    ("train.py", ["--eval_r=[1.5]"], "--eval_r must list whole numbers of steps >= 1"),
    ("train.py", ["--lr_schedule=linear"], "--lr_schedule must be one of 'cosine', 'wsd', 'constant'"),
    # schedules that never run at learning_rate (the default cooldown of 1,000 in a 100-iteration wsd run)
    ("train.py", ["--lr_schedule=wsd", "--max_iters=100"], "wsd's --cooldown_iters at most max_iters - warmup_iters (95)"),
    ("train.py", ["--warmup_iters=6", "--lr_decay_iters=3"], "cosine's --lr_decay_iters above --warmup_iters (6) or 0"),
    ("train.py", ["--sigma=1e999"], "sigma must be >= 0, rope_base and norm_eps > 0, all finite"),
    ("train.py", ["--init_from=gpt2"], "--init_from is scratch, resume, huginn-0125 or a folder"),
    ("train.py", ["--init_from={tmp}/text"], "--init_from is scratch, resume, huginn-0125 or a folder"),  # a run folder
    ("train.py", ["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be a whole number >= 1"),
    ("train.py", ["--compile=maybe"], "compile expects bool"),
    ("train.py", ["--device=cuda"], "no CUDA GPU"),
    ("train.py", ["--device=tpu"], "--device must be cpu, cuda, cuda:N or mps"),
    ("train.py", ["--dtype=float16"], "--dtype must be one of bfloat16, float32"),
    ("train.py", ["--num_threads=-2"], "--num_threads must be >= 0"),
    # train.py: data
    ("train.py", ["--data_dir={tmp}/missing"], "no meta.json in {tmp}/missing; run: python prepare_data.py "
                                               "fineweb_edu --out_dir={tmp}/missing"),  # there, not in data/
    ("train.py", ["--data_dir=", "--dataset=nonexistent"], "--dataset names a folder under data/"),
    ("train.py", ["--data_dir={tmp}/char-odd"], "cut short (an odd number of bytes)"),
    ("train.py", ["--data_dir={tmp}/char-empty-val"], "val.bin is empty"),
    ("train.py", ["--data_dir={tmp}/char-bad-meta"], "is not readable JSON"),
    ("train.py", ["--data_dir={tmp}/char-no-vocab"], "lacks a tokenizer and a vocab_size"),
    ("train.py", ["--data_dir={tmp}/char-big-id"], "holds token id 60000, outside the vocabulary"),
    ("train.py", ["--data_dir={tmp}/rows", "--block_size=32"], "set --block_size="),
    ("train.py", ["--data_dir={tmp}/cups-unlabelled", "--block_size=@cups"], "no labelled positions"),
    ("train.py", ["--data_dir={tmp}/char-no-chars"], "lacks its vocab_size of characters"),
    ("train.py", ["--data_dir={tmp}/cups-no-difficulty", "--block_size=@cups"], "val_difficulty.bin is missing"),
    ("eval.py", ["--out_dir={tmp}/cups", "--data_dir={tmp}/cups-no-difficulty"], "val_difficulty.bin is missing"),
    ("train.py", ["--data_dir={tmp}/cups-short-difficulty", "--block_size=@cups"], "val_difficulty.bin has"),
    ("train.py", ["--data_dir={tmp}/cups-cut-rows", "--block_size=@cups"], "train.bin holds"),
    ("train.py", ["--block_size=100000"], "block_size=100000 is too long"),
    # train.py: checkpoints and the run folder
    ("train.py", ["--out_dir={tmp}/text"], "holds a trained model; continue it with --init_from=resume"),
    ("train.py", ["--out_dir={tmp}/a-file"], "is a file, not a folder"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/nowhere"], "no checkpoint at"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/ckpt-empty"], "is not a readable checkpoint"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/ckpt-random"], "is not a readable checkpoint"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/ckpt-zip"], "is not a readable checkpoint"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/text", "--max_iters=5"], "raise --max_iters"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/text", "--max_iters=50", "--data_dir={tmp}/char-lower"],
     "has another vocabulary than {tmp}/text/ckpt.pt (vocab_size differs)"),
    ("train.py", ["--init_from=resume", "--out_dir={tmp}/text", "--max_iters=50", "--lora_rank=4"],
     "was trained from scratch, not fine-tuned from the release; resume it without --lora_rank"),
    # sample.py
    ("sample.py", ["--draft_steps=2", "--temperature=0", "--lookahead=0"], "--lookahead must be a whole number >= 1"),
    ("sample.py", ["--exit_criterion=kl", "--exit_threshold=abc"], "--exit_threshold must be a number >= 0"),
    ("sample.py", ["--exit_criterion=kl", "--exit_threshold=-1"], "--exit_threshold must be a number >= 0"),
    ("sample.py", ["--exit_criterion=confident-run", "--exit_threshold=0.5"], "--exit_threshold must be a whole"),
    ("sample.py", ["--exit_criterion=entropy"], "--exit_criterion must be one of"),
    ("sample.py", ["--seed=18446744073709551616"], "--seed must be a whole number >= 0 (below 2^63)"),  # a traceback
    ("sample.py", ["--init_from={tmp}/unread-release", "--exit_criterion=gate"], "the release has none"),
    ("sample.py", ["--init_from={tmp}/unread-release", "--cache_budget=3"], "multiple of n_layers_core (2), got 3"),
    ("sample.py", ["--init_from={tmp}/unread-release", "--temperature=0", "--r=2", "--draft_steps=2"],
     "--draft_steps (2) must be below r (2)"),
    ("sample.py", ["--init_from={tmp}/unread-release", "--temperature=0", "--draft_steps=1", "--lookahead=40"],
     "--lookahead (40) must be below half of block_size (64)"),
    ("sample.py", ["--exit_criterion=gate", "--exit_threshold=5"], "--exit_threshold must be a number >= 0 and < 1"),
    ("sample.py", ["--exit_threshold=0.1", "--out_dir={tmp}/text"], "--exit_threshold is the exit criterion's"),
    ("sample.py", ["--start=To be", "--prompts={tmp}/play.txt", "--out_dir={tmp}/text"],
     "--start and --prompts both give the prompt"),
    ("sample.py", ["--exit_criterion=gate", "--out_dir={tmp}/text"], "needs a gate exits.py fit on this checkpoint"),
    ("sample.py", ["--out_dir={tmp}/gate-broken"], "exit_gate.pt is not a readable exit gate"),
    ("sample.py", ["--num_samples=0"], "--num_samples must be a whole number >= 1"),
    ("sample.py", ["--max_new_tokens=0"], "--max_new_tokens must be a whole number >= 1"),
    ("sample.py", ["--temperature=-1"], "--temperature must be a number >= 0"),
    ("sample.py", ["--top_k=-1"], "--top_k must be a whole number >= 0"),
    ("sample.py", ["--r=0"], "--r must be a whole number >= 1"),
    ("sample.py", ["--r=2.5"], "--r must be a whole number >= 1"),
    ("sample.py", ["--cache_budget=0"], "--cache_budget must be a whole number >= 1"),
    ("sample.py", ["--cache_budget=3", "--out_dir={tmp}/text"], "multiple of n_layers_core"),
    ("sample.py", ["--draft_steps=8", "--r=4", "--temperature=0", "--out_dir={tmp}/text"], "must be below r (4)"),
    ("sample.py", ["--draft_steps=2"], "--temperature 0"),
    ("sample.py", ["--draft_steps=2", "--r=4", "--temperature=0", "--cache_budget=2", "--out_dir={tmp}/text"],
     "needs every step's cache entries"),
    ("sample.py", ["--draft_steps=2", "--r=4", "--temperature=0", "--lookahead=20", "--out_dir={tmp}/text"],
     "--lookahead (20) must be below half of block_size (32)"),
    ("sample.py", ["--start=FILE:{tmp}/latin1.txt"], "is not UTF-8 text (byte 0xe9 at offset 24)"),
    ("sample.py", ["--start=FILE:{tmp}/bom-latin1.txt"], "is not UTF-8 text (byte 0xe9 at offset 27)"),
    ("sample.py", ["--start=FILE:{tmp}/missing.txt"], "--start: '{tmp}/missing.txt' is not a file"),
    ("sample.py", ["--prompts={tmp}/latin1.txt", "--out_dir={tmp}/text"], "--prompts: '{tmp}/latin1.txt' is not UTF-8"),
    ("sample.py", ["--prompts={tmp}/blank.txt", "--out_dir={tmp}/text"], "holds no prompt; give one per line"),
    ("sample.py", ["--chat", "--out_dir={tmp}/text"], "--chat is for the released model and its fine-tunes"),
    ("sample.py", ["--device=cuda"], "no CUDA GPU"),
    ("sample.py", ["--dtype=int8"], "--dtype must be one of"),
    ("sample.py", ["--compile=maybe"], "--compile must be True or False"),
    ("sample.py", ["--calibration_tokens=-1"], "--calibration_tokens must be a whole number >= 0"),
    ("sample.py", ["--quantize=int8", "--out_dir={tmp}/text-nodata"],
     "{tmp}/gone has none: prepare it again (prepare_data.py), or add --calibration_tokens=0 to round"),
    ("sample.py", ["--out_dir={tmp}/nowhere"], "no checkpoint at {tmp}/nowhere/ckpt.pt"),
    ("sample.py", ["--out_dir={tmp}/ckpt-empty"], "is not a readable checkpoint (EOFError"),
    ("sample.py", ["--out_dir={tmp}/ckpt-random"], "is not a readable checkpoint"),
    ("sample.py", ["--out_dir={tmp}/cups"], "answers reasoning problems rather than continuing text"),
    ("sample.py", ["--out_dir={tmp}/text", "--start=~~~"], "characters the model's vocabulary lacks"),
    # eval.py
    ("eval.py", ["--r=[0]", "--out_dir={tmp}/cups"], "--r must list whole numbers of steps >= 1"),
    ("eval.py", ["--init_scale=-1", "--out_dir={tmp}/cups"], "--init_scale must be a number >= 0"),
    ("eval.py", ["--device=cuda", "--out_dir={tmp}/cups"], "no CUDA GPU"),
    ("eval.py", ["--out_dir={tmp}/text", "--problem=012"], "--problem is for checkpoints that answer problems"),
    ("eval.py", ["--out_dir={tmp}/cups", "--problem=" + "0" * 60], "--problem has 60 characters"),
    ("eval.py", ["--out_dir={tmp}/cups", "--problem=9"], "characters the model's vocabulary lacks"),
    ("eval.py", ["--out_dir={tmp}/cups", "--data_dir={tmp}/char"], "another vocabulary than the checkpoint"),
    ("eval.py", ["--out_dir={tmp}/text", "--data_dir={tmp}/rows"], "the checkpoint reads blocks of 32"),
    ("eval.py", ["--out_dir={tmp}/ckpt-zip"], "is not a readable checkpoint"),
    ("eval.py", ["--out_dir={tmp}/cups", "--quantize=int8", "--calibration_tokens=-8"],
     "--calibration_tokens must be a whole number >= 0"),
    # latents.py
    ("latents.py", ["--r=0"], "--r must be a whole number >= 1"),
    ("latents.py", ["--prefix=sub/x_"], "--prefix=sub/x_ is the start of the pictures' file names"),
    ("latents.py", ["--dtype=bfloat16"], "--dtype is the released model's"),
    ("latents.py", ["--init_scale=-1"], "--init_scale must be a number >= 0"),
    ("latents.py", ["--EXIT_THRESHOLDS={}"], "unknown setting --EXIT_THRESHOLDS"),
    ("latents.py", ["--think_meter=maybe"], "--think_meter must be True or False"),
    ("latents.py", ["--out_dir={tmp}/a-file"], "is a file, not a folder"),
    ("latents.py", ["--out_dir={tmp}/text", "--plot_dir={tmp}/a-file"], "--plot_dir={tmp}/a-file is a file"),
    ("latents.py", ["--out_dir={tmp}/text", "--start=FILE:{tmp}/latin1.txt"], "is not UTF-8 text"),
    ("latents.py", ["--out_dir={tmp}/text", "--start=To be", "--tokens=[9]"], "--tokens must be positions"),
    ("latents.py", ["--out_dir={tmp}/cups", "--start=" + "0" * 60], "the problem has 60 moves; this checkpoint reads"),
    # exits.py: its settings before the gate is fit and saved over the last one
    ("exits.py", ["--rules={'confident_run': [4]}"], "--rules: no exit rule 'confident_run'"),
    ("exits.py", ["--rules={'kl': []}"], "--rules: kl's thresholds must be a list of numbers > 0"),
    ("exits.py", ["--rules={'kl': 0.01}"], "--rules: kl's thresholds must be a list of numbers > 0"),
    ("exits.py", ["--hidden=0"], "--hidden must be a whole number >= 1"),
    ("exits.py", ["--rules={'gate': [0.01, 5]}"], "--rules: gate's thresholds must be a list of numbers > 0 and < 1"),
    ("exits.py", ["--max_rows=1"], "--max_rows: the gate fits on the even val rows and is scored on the odd ones"),
    ("exits.py", ["--data_dir={tmp}/cups-one-val-row"], "has 1 val row: the gate fits on the even rows"),
    # prepare_data.py
    ("prepare_data.py", ["shakespeare_char", "--input={tmp}/play.txt", "--val_fraction=2"],
     "--val_fraction must be a number >= 0 and < 1"),
    ("prepare_data.py", ["shakespeare_char", "--input={tmp}/play.txt", "--val_fraction=0", "--out_dir={tmp}/prepared"], "leaves one split empty"),
    ("prepare_data.py", ["reasoning", "--num_train_problems=0"], "--num_train_problems must be a whole number >= 1"),
    ("prepare_data.py", ["reasoning", "--train_max_difficulty=20000"], "which must stay below 65536"),
    ("prepare_data.py", ["shakespeare_char", "--input={tmp}/latin1.txt", "--out_dir={tmp}/prepared"], "is not UTF-8 text (byte 0xe9"),
    ("prepare_data.py", ["shakespeare_char", "--input={tmp}/missing.txt", "--out_dir={tmp}/prepared"], "--input: '{tmp}/missing.txt' is not a file"),
    ("prepare_data.py", ["problems", "--input={tmp}/problems-latin1.txt", "--out_dir={tmp}/prepared"], "is not UTF-8 text (byte 0xe9 at offset"),
    ("prepare_data.py", ["shakespeare_char", "--input={tmp}/play.txt", "--out_dir={tmp}/a-file"], "is a file"),
    ("prepare_data.py", ["nonexistent"], "unknown dataset 'nonexistent'"),
    ("prepare_data.py", ["reasoning", "--input={tmp}/play.txt"], "reasoning is generated from --seed"),
    ("prepare_data.py", ["--input=x"], "name a dataset first"),
    # bench.py
    ("bench.py", ["--sections=memory", "--memory_r=[0]"], "--memory_r must list whole numbers of steps >= 1"),
    ("bench.py", ["--probe_memory_at=0"], "--probe_memory_at is internal"),
    ("bench.py", ["--sections=speed"], "--sections is a comma-separated list"),
    ("bench.py", ["--sections=memory,decode", "--decode_out_dir={tmp}/cups"], "block_size 17 leaves no room for a prompt"),
    ("bench.py", ["--n_head=5"], "n_embd (256) must be n_head (5)"),
    ("bench.py", ["--timer=gpu"], "--timer must be one of"),
    ("bench.py", ["--new_tokens=1"], "--new_tokens must be a whole number >= 2"),
    ("bench.py", ["--draft_steps=8", "--decode_r=[8]"], "--draft_steps (8) must be below every r"),
    ("bench.py", ["--decode_out_dir={tmp}/nowhere"], "point --decode_out_dir at one"),
    ("bench.py", ["--out_dir={tmp}/a-file"], "is a file, not a folder"),
    ("bench.py", ["--preset=huge"], "unknown --preset 'huge'"),
    ("bench.py", ["--device=cuda"], "no CUDA GPU"),
]
DEFAULTS = {"train.py": [*TINY, "--data_dir={tmp}/char", "--out_dir={tmp}/fresh"], "sample.py": ["--device=cpu"],
            "eval.py": ["--plot=False"], "exits.py": ["--out_dir={tmp}/cups"], "latents.py": ["--plot=False"],
            "prepare_data.py": [], "bench.py": ["--out_dir={tmp}/bench"]}


@pytest.mark.parametrize("script,args,expected", CASES, ids=[f"{c[0]} {' '.join(c[1])}"[:80] for c in CASES])
def test_one_line_error(files, capsys, script, args, expected):
    if "--decode_out_dir={tmp}/nowhere" in args:  # bench.py checks the checkpoint when its decode section starts
        args = args + ["--sections=decode"]
    cups_rows = json.loads((files / "rows" / "meta.json").read_text())["row_len"]
    fill = lambda text: text.replace("{tmp}", str(files)).replace("@cups", str(cups_rows))
    code = run_script(script, *map(fill, DEFAULTS[script] + args))
    assert isinstance(code, str), f"{script} {args} did not stop with an error (exit {code!r})"
    assert code.startswith("error: ") and "\n" not in code and fill(expected) in code, code
    assert "Traceback" not in capsys.readouterr().err


def test_files_another_dataset_left_are_not_read(files, tmp_path):
    """Character data prepared into a folder that held three-cups rows and shards: its meta.json says what the data
    is, so the stale targets and shards are not read (they were, and the error's hint could not remove them)."""
    from dataloader import TokenData
    folder = tmp_path / "reused"
    folder.mkdir()
    for f in (files / "char").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    for name in ("train_targets.bin", "val_targets.bin", "val_difficulty.bin"):
        (folder / name).write_bytes((files / "rows" / name).read_bytes())
    (folder / "train_000001.bin").write_bytes((files / "char" / "train.bin").read_bytes())
    data = TokenData(str(folder), 32)
    assert not data.aligned and data.shards == {"train": ["train.bin"], "val": ["val.bin"]}
    assert data.num_blocks("train") == TokenData(str(files / "char"), 32).num_blocks("train")
    out = tmp_path / "out"  # and eval.py scores it as the text it is, not as problems
    out.mkdir()
    (out / "ckpt.pt").write_bytes((files / "text" / "ckpt.pt").read_bytes())
    assert run_script("eval.py", f"--out_dir={out}", f"--data_dir={folder}", "--r=[1,2]", "--plot=False") is None
    assert (out / "eval.json").is_file() and not (out / "accuracy.json").exists()


def test_checkpoint_and_log_survive_a_refused_scratch_run(files):
    """Running the training command again without --init_from=resume changes nothing in the folder; with --overwrite,
    the folder's checkpoint, log and settings stay the old run's until the new run saves."""
    out = files / "kept"
    assert run_script("train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}", "--max_iters=2",
                      "--eval_interval=2") is None
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    code = run_script("train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}", "--max_iters=2")
    assert "holds a trained model" in code
    assert before == {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    # a replacing run that dies before its first save leaves the old run's checkpoint, log and settings together
    before["config.json"] = (out / "config.json").read_bytes()
    code = run_script("train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}", "--max_iters=4",
                      "--eval_interval=4", "--overwrite", "--learning_rate=1e30")
    assert "stopped before the update" in code
    assert before == {name: (out / name).read_bytes() for name in before}
    assert json.loads((out / "config.json.new").read_text())["learning_rate"] == 1e30
    # --overwrite means it: a new run, a new log (and its settings) from its first save
    assert run_script("train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}", "--max_iters=1",
                      "--eval_interval=1", "--overwrite") is None
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["iter"] for rec in log if "val_loss" in rec] == [0, 1]
    assert json.loads((out / "config.json").read_text())["max_iters"] == 1
    assert not list(out.glob("*.new"))


def train_process(*args):
    return subprocess.Popen([sys.executable, "train.py", *TINY, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_one_run_per_folder_and_a_crashed_run_is_taken_over(files):
    out = files / "locked"
    first = train_process(f"--data_dir={files / 'char'}", f"--out_dir={out}", "--max_iters=100000",
                          "--eval_interval=3")
    for line in first.stdout:  # it holds the folder once it has saved
        if line.startswith("saved"):
            break
    second = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}",
                             "--init_from=resume", "--max_iters=100000"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode != 0 and second.stderr.count("\n") == 1, second.stderr
    assert f"is in use by another run (pid {first.pid} on" in second.stderr
    first.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, the file still names the dead run
    first.wait()
    iteration = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    third = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}",
                            "--init_from=resume", f"--max_iters={iteration + 1}"], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert f"taking over {out / 'run.lock'} from pid {first.pid}" in third.stdout
    assert (out / "run.lock").read_text() == ""  # a run that ends normally leaves nothing to take over


# runs train.py with writes failing as on a full disk from the second save on: a file may grow no further than
# 20 kB (the checkpoint is larger; the log is not). torch's writer reports the failed write as a RuntimeError
FULL_DISK = """
import resource, runpy, signal, sys
import torch
calls = []
def save(obj, f):
    calls.append(1)
    if len(calls) == 2:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    return real_save(obj, f)
real_save, torch.save = torch.save, save
sys.path.insert(0, ".")
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_failed_save_keeps_the_last_checkpoint(files, tmp_path):
    launcher = tmp_path / "full_disk.py"
    launcher.write_text(FULL_DISK)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(launcher), *TINY, f"--data_dir={files / 'char'}", f"--out_dir={out}",
                           "--max_iters=4", "--eval_interval=2"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: could not save the checkpoint (") and "the last good one" in proc.stderr
    assert not (out / "ckpt.pt.tmp").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2


def test_bench_memory_probe_cannot_multiply(tmp_path, monkeypatch):
    """bench.py measures memory in child processes, one r each; r = 0 is refused in the parent, before any child
    starts."""
    children = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: children.append(args) or 1 / 0)
    code = run_script("bench.py", "--sections=memory", "--memory_r=[0]", f"--out_dir={tmp_path}")
    assert str(code).startswith("error: --memory_r must list") and children == []


def test_gptq_that_would_not_fit_in_memory_is_refused_before_it_runs(files, monkeypatch):
    """GPTQ holds every layer's X^T X at once (13 GB beside the 14 GB of a 3.5B fine-tune): where that and the model
    exceed the machine's memory, int8 stops before the calibration runs, saying how to round to nearest instead."""
    import checkpoints
    monkeypatch.setattr(checkpoints, "memory_bytes", lambda: 10**6)  # a machine of 1 MB
    calibrated = []
    monkeypatch.setattr(checkpoints, "calibration_hessians", lambda *args: calibrated.append(args) or 1 / 0)
    code = run_script("sample.py", "--device=cpu", "--quantize=int8", f"--out_dir={files / 'text'}")
    assert str(code).startswith("error: --quantize int8: GPTQ's statistics (0.0 GB) and the model (") and \
        str(code).endswith("add --calibration_tokens=0 to round to nearest") and calibrated == []


def test_settings_are_refused_before_gptq_runs(files, monkeypatch):
    """int8's calibration costs minutes at the released size: every refusal comes before it (they came after)."""
    import checkpoints

    def calibration(*args):
        raise AssertionError("GPTQ calibrated before the settings were refused")
    monkeypatch.setattr(checkpoints, "calibration_hessians", calibration)
    for script, args, expected in [
            ("sample.py", ["--chat"], "--chat is for the released model"),
            ("sample.py", ["--start=~~~"], "characters the model's vocabulary lacks"),
            ("eval.py", ["--problem=012", "--plot=False"], "--problem is for checkpoints that answer problems")]:
        code = run_script(script, "--quantize=int8", f"--out_dir={files / 'text'}", *args)
        assert str(code).startswith("error: ") and expected in code, code


def test_a_char_model_exports_without_a_tokenizer_and_says_so(files, tmp_path, capsys, monkeypatch):
    """export.py writes the weights of a model trained here on characters, and says that no tokenizer.json comes with
    them (the released layout holds the release's tokenizer only); reading the folder back says why it cannot. It
    never writes over an export cut short, and a failed write or a base's cut config.json stops in one line."""
    pytest.importorskip("safetensors", reason="needs safetensors (pip install safetensors)")
    assert run_script("export.py", f"--out_dir={files / 'text'}", f"--to={tmp_path / 'exported'}") is None
    assert "warning: no tokenizer.json: this model reads char tokens" in capsys.readouterr().err
    code = run_script("sample.py", f"--init_from={tmp_path / 'exported'}", "--device=cpu")
    assert code.startswith("error: no tokenizer.json in") and "needs the release's tokenizer" in code
    # an export cut short before its config.json (written last) leaves shards a second export would mix with its own
    os.remove(tmp_path / "exported" / "config.json")
    code = run_script("export.py", f"--out_dir={files / 'text'}", f"--to={tmp_path / 'exported'}")
    assert code.startswith(f"error: {tmp_path / 'exported'} already holds a model's files") and "\n" not in code
    # a write that fails (a full disk): one line, and no config.json that would make the folder look whole
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code = run_script("export.py", f"--out_dir={files / 'text'}", f"--to={tmp_path / 'full'}")
    assert code.startswith(f"error: could not write {tmp_path / 'full' / 'model.safetensors'} (Error while") \
        and "\n" not in code and not (tmp_path / "full" / "config.json").exists()
    # a fine-tune whose base's config.json (the keys ours does not know come from it) is cut short
    checkpoint = torch.load(files / "text" / "ckpt.pt", weights_only=False)
    checkpoint["base"] = str(tmp_path / "base")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"n_embd": 32, "vocab')
    (tmp_path / "tuned").mkdir()
    torch.save(checkpoint, tmp_path / "tuned" / "ckpt.pt")
    code = run_script("export.py", f"--out_dir={tmp_path / 'tuned'}", f"--to={tmp_path / 'tuned-export'}")
    assert code.startswith(f"error: {tmp_path / 'base' / 'config.json'} does not read as JSON") and "\n" not in code
