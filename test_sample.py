"""Tests for sample.py, the command line: prompts, tokenizers, the decoding options, one-line errors. CPU only.
decode.py's own tests are in test_decode.py."""

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model import RecurrentGPT, config_from_preset

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RecurrentGPT(config_from_preset("tiny", **{"n_layers_core": 2, "block_size": 128, **overrides})).eval()


# --- sample.py -----------------------------------------------------------------------------------------------


CHARS = "\n abcdefghijklmnopqrstuvwxyz"


def write_checkpoint(path, meta, vocab_size):
    """A checkpoint in train.py's format, of an untrained tiny model."""
    model = tiny_model(vocab_size=vocab_size, block_size=32)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "meta": meta,
                "config": {}, "iter_num": 0, "best_val_loss": float("inf")}, path / "ckpt.pt")
    return str(path)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    meta = {"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS}
    return write_checkpoint(tmp_path_factory.mktemp("out"), meta, len(CHARS))


def run_sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "sample.py", "--device=cpu", "--num_samples=1", "--max_new_tokens=6",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_sample_cli(out_dir):
    result = run_sample(f"--out_dir={out_dir}", "--start", "to be", "--r", "32")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "mean 32.00 steps per token (r = 32)" in result.stdout
    assert result.stdout.splitlines()[1].startswith("to be")


def test_sample_cli_inference_options(out_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("hello")
    result = run_sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt_file}", "--r=32", "--exit_criterion", "kl",
                        "--exit_threshold", "1", "--cache_budget", "2", "--warm_start", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("hello") and "(r = 32)" in result.stdout
    assert "mean 32.00 steps" not in result.stdout  # the kl exit reached generate: tokens stopped early


def test_sample_cli_int8_counts_the_float_parameters(out_dir):
    """An int8 model's weights are buffers, not parameters: sample.py printed 0.00M for it."""
    result = run_sample(f"--out_dir={out_dir}", "--quantize=int8", "--calibration_tokens=0", "--start=to be")
    assert result.returncode == 0, result.stderr
    float_params = tiny_model(vocab_size=len(CHARS), block_size=32).get_num_params()
    assert f": {float_params / 1e6:.2f}M parameters" in result.stdout and float_params > 10**4


def test_sample_cli_bpe_tokenizer(tmp_path):
    out = write_checkpoint(tmp_path, {"tokenizer": "r50k_base", "vocab_size": 50257}, 50304)
    result = run_sample(f"--out_dir={out}", "--start", "Hello world", "--r", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("Hello world") and "(r = 2)" in result.stdout


def test_sample_cli_crops_long_prompt_with_a_warning(out_dir):
    result = run_sample(f"--out_dir={out_dir}", "--start", "ab" * 40)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "warning" in result.stderr and "block_size 32" in result.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "r0", "unknown_char", "bad_criterion", "draft_sampling",
                                  "budget"])
def test_sample_cli_bad_input_is_one_line(out_dir, tmp_path, case):
    args = {"missing": [f"--out_dir={tmp_path / 'nowhere'}"],
            "corrupt": [f"--out_dir={tmp_path}"],
            "r0": [f"--out_dir={out_dir}", "--r", "0"],
            "unknown_char": [f"--out_dir={out_dir}", "--start", "Hello!"],
            "bad_criterion": [f"--out_dir={out_dir}", "--exit_criterion", "entropy"],
            "draft_sampling": [f"--out_dir={out_dir}", "--draft_steps", "2"],
            "budget": [f"--out_dir={out_dir}", "--cache_budget", "3"]}[case]
    if case == "corrupt":
        (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run_sample(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert {"missing": "no checkpoint", "corrupt": "not a readable checkpoint", "r0": "--r", "unknown_char": "'!H'",
            "bad_criterion": "exit_criterion", "draft_sampling": "--temperature 0",
            "budget": "multiple of n_layers_core"}[case] in lines[0]


def test_sample_cli_sends_reasoning_checkpoints_to_eval(tmp_path):
    """A model trained on aligned targets (meta row_len) answers problems instead of continuing text: eval.py."""
    meta = {"tokenizer": "char", "vocab_size": 7, "chars": "\n012345", "row_len": 16, "examples": []}
    write_checkpoint(tmp_path, meta, 7)
    result = run_sample(f"--out_dir={tmp_path}")
    assert result.returncode != 0 and result.stderr.strip() == (f"error: {tmp_path} answers reasoning problems "
                                                                 f"rather than continuing text: python eval.py "
                                                                 f"--out_dir={tmp_path}")


def test_sample_cli_speculative(out_dir):
    common = [f"--out_dir={out_dir}", "--start", "to be", "--r", "6", "--temperature", "0", "--max_new_tokens", "20"]
    with ThreadPoolExecutor(2) as pool:  # both at once: each spends most of its time importing torch
        plain, fast = pool.map(lambda extra: run_sample(*common, *extra), [[], ["--draft_steps=2", "--lookahead=3"]])
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert plain.stdout.splitlines()[1] == fast.stdout.splitlines()[1]  # the same text
    assert "drafts accepted" in fast.stdout


def test_sample_cli_prompts_of_different_lengths_in_one_batch(out_dir, tmp_path):
    """--prompts: one prompt per line, decoded together; each row prints its own prompt and continuation, the same
    as that prompt alone (greedy, zero start). The file has Windows line ends (a "\r" ended every prompt)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"to be\r\n\r\na b c d e f g\r\nz\r\n")
    common = [f"--out_dir={out_dir}", "--r=3", "--temperature=0", "--init_scale=0", "--max_new_tokens=5"]
    with ThreadPoolExecutor(2) as pool:  # both at once: each spends most of its time importing torch
        batch, alone = pool.map(lambda extra: run_sample(*common, *extra), [[f"--prompts={prompts}"],
                                                                          ["--start", "a b c d e f g"]])
    assert batch.returncode == alone.returncode == 0, batch.stderr
    assert "decoding 3 prompt(s)" in batch.stdout.splitlines()[0]
    # the rows, printed one after another (a continuation may hold a newline of its own)
    rows, row = [out.stdout.split("\n", 1)[1].split("--- sample")[0] for out in (batch, alone)]
    at = rows.index(row)  # the middle row as if alone
    assert rows.startswith("to be") and rows[at - 1] == "\n" and row.startswith("a b c d e f g")
    assert rows[at + len(row):].startswith("z")
