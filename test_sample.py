"""Tests for decoding: the depth-aware KV cache, early exit, cache budget, warm start, and sample.py. CPU only."""

import os
import subprocess
import sys

import pytest
import torch

from model import RecurrentGPT, RecurrentKVCache, config_from_preset, forward_cached, generate

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.abspath(__file__))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    # two core layers, so that the cache's (iteration, layer) bookkeeping is exercised
    return RecurrentGPT(config_from_preset("tiny", **{"n_layers_core": 2, "block_size": 128, **overrides})).eval()


def prompt(model, T=8, seed=1):
    return torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))


PATTERN = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # a repeating sequence the trained model learns to continue


@pytest.fixture(scope="module")
def trained_model():
    """The tiny model trained briefly (with the usual random depth) to continue PATTERN; a few seconds."""
    model = tiny_model(vocab_size=16)
    model.train()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    stream = torch.tensor(PATTERN).repeat(50)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        ix = torch.randint(0, len(stream) - 33, (16,), generator=g)
        x = torch.stack([stream[i:i + 32] for i in ix])
        y = torch.stack([stream[i + 1:i + 33] for i in ix])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3  # it has learned the pattern
    return model.eval()


# --- the cache reproduces forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 8])
def test_cached_greedy_decoding_equals_recomputing(r):
    model = tiny_model()
    idx = prompt(model)
    # init_scale=0: the zero start state, so both paths see the same s_0 at every position
    cached, steps = generate(model, idx, 64, num_steps=r, temperature=0, init_scale=0)
    recomputed, _ = generate(model, idx, 64, num_steps=r, temperature=0, init_scale=0, use_cache=False)
    assert cached.shape == (1, 8 + 64) and steps == [r] * 64
    assert torch.equal(cached, recomputed)
    # and the logits at every position agree with one forward over the whole sequence
    full_logits, _ = model(cached, num_steps=r, init_scale=0)  # (1, T, vocab)
    cache = RecurrentKVCache(model.config.n_layers_core, cached.size(1))
    with torch.no_grad():
        for t in range(cached.size(1)):
            logits, _, _ = forward_cached(model, cached[:, t:t + 1], cache, r, init_scale=0)
            torch.testing.assert_close(logits, full_logits[:, t], atol=1e-4, rtol=0)
    assert cache.num_core_entries() == r * model.config.n_layers_core  # one per (iteration, core layer)
    assert len(cache.keys) == r * 2 + model.config.n_layers_prelude + model.config.n_layers_coda


def test_context_longer_than_block_size_keeps_decoding():
    model = tiny_model(block_size=32)
    out, steps = generate(model, prompt(model, T=30), 40, num_steps=2, temperature=1.0)
    assert out.shape == (1, 70) and len(steps) == 40
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompt(model, T=33), 1)


# --- adaptive exit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_threshold_zero_never_exits(criterion):
    model = tiny_model()
    idx = prompt(model)
    runs = []
    for exit_criterion in ("none", criterion):
        torch.manual_seed(5)  # the same noise starts and the same samples in both runs
        runs.append(generate(model, idx, 32, num_steps=6, temperature=1.0, exit_criterion=exit_criterion,
                             exit_threshold=0.0))
    (fixed, fixed_steps), (adaptive, adaptive_steps) = runs
    assert torch.equal(fixed, adaptive)
    assert fixed_steps == adaptive_steps == [6] * 32


@pytest.mark.parametrize("criterion,threshold", [("kl", 1e-3), ("latent-diff", 0.05)])
def test_positive_threshold_exits_early_on_trained_model(trained_model, criterion, threshold):
    r = 8
    idx = torch.tensor([PATTERN[:5]])
    out, steps = generate(trained_model, idx, 48, num_steps=r, temperature=0, exit_criterion=criterion,
                          exit_threshold=threshold)
    mean_steps = sum(steps) / len(steps)
    print(f"{criterion} < {threshold}: mean {mean_steps:.2f} iterations per token at r = {r}")
    assert mean_steps < r and min(steps) >= 1
    expected = torch.tensor(PATTERN * 5)[:out.size(1)]
    assert (out[0] == expected).float().mean() > 0.9  # exiting early kept the continuation right


def test_exited_token_is_read_at_its_latest_iteration():
    """A token that ran s < r iterations is read by later tokens, at iterations above s, through its
    entry of iteration s for the same core layer (the reference's latest-m4)."""
    model = tiny_model()
    idx = prompt(model, T=6)
    L, r, s = model.config.n_layers_core, 5, 2
    cache = RecurrentKVCache(L, 16)
    with torch.no_grad():
        forward_cached(model, idx[:, :4], cache, r)
        forward_cached(model, idx[:, 4:5], cache, s)  # position 4 exits after s iterations
        forward_cached(model, idx[:, 5:6], cache, r)  # position 5 runs all r and reads position 4
    for step in range(s, r):
        for layer in range(L):
            entry, latest = cache.entry(("core", step, layer)), cache.entry(("core", s - 1, layer))
            assert torch.equal(cache.keys[entry][:, :, 4], cache.keys[latest][:, :, 4])
            assert torch.equal(cache.values[entry][:, :, 4], cache.values[latest][:, :, 4])
    assert not torch.equal(cache.keys[cache.entry(("core", r - 1, 0))][:, :, 3],
                           cache.keys[cache.entry(("core", s - 1, 0))][:, :, 3])  # full-depth tokens keep theirs


# --- cache budget --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 3, 8, 16])
def test_cache_budget_bounds_core_entries(r):
    model = tiny_model()
    idx = prompt(model)
    L, budget = model.config.n_layers_core, 4
    cache = RecurrentKVCache(L, 16, cache_budget=budget)
    with torch.no_grad():
        for t in range(idx.size(1)):
            forward_cached(model, idx[:, t:t + 1], cache, r)
    assert cache.num_core_entries() == min(budget, r * L)
    assert len(cache.keys) - cache.num_core_entries() == model.config.n_layers_prelude + model.config.n_layers_coda
    out, steps = generate(model, idx, 16, num_steps=r, temperature=0, cache_budget=budget)
    assert out.shape == (1, 24) and steps == [r] * 16


def test_budget_of_every_entry_changes_nothing():
    model = tiny_model()
    idx = prompt(model)
    r, L = 3, model.config.n_layers_core
    full, _ = generate(model, idx, 32, num_steps=r, temperature=0, init_scale=0)
    budgeted, _ = generate(model, idx, 32, num_steps=r, temperature=0, init_scale=0, cache_budget=r * L)
    assert torch.equal(full, budgeted)


# --- warm start ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm_start", [True, False])
def test_warm_start_begins_at_previous_final_state(warm_start):
    model = tiny_model()
    idx = prompt(model, T=4)
    r, calls = 3, []
    core_step = model.core_step

    def recording_core_step(state, e, rope, kv_cache=None, step=0):
        out = core_step(state, e, rope, kv_cache, step)
        calls.append((state, out))
        return out

    model.core_step = recording_core_step
    generate(model, idx, 5, num_steps=r, warm_start=warm_start)
    # the prefill (positions 0..2) makes r calls, then each of the 5 tokens makes r calls
    assert len(calls) == r * 6 and all(calls[r * i][0].size(1) == 1 for i in range(1, 6))
    for i in range(1, 6):
        first_input, previous_final = calls[r * i][0], calls[r * i - 1][1][:, -1:]
        assert torch.equal(first_input, previous_final) == warm_start


# --- sample.py -----------------------------------------------------------------------------------------------


CHARS = "\n abcdefghijklmnopqrstuvwxyz"


def write_checkpoint(path, meta, vocab_size):
    """A checkpoint in train.py's format, of an untrained tiny model."""
    import dataclasses
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
    assert "tokens/s" in result.stdout and "mean 32.00 iterations per token (r = 32)" in result.stdout
    assert result.stdout.splitlines()[1].startswith("to be")


def test_sample_cli_inference_options(out_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("hello")
    result = run_sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt_file}", "--r=32", "--exit_criterion", "kl",
                        "--exit_threshold", "1", "--cache_budget", "2", "--warm_start", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("hello") and "(r = 32)" in result.stdout


def test_sample_cli_bpe_tokenizer(tmp_path):
    out = write_checkpoint(tmp_path, {"tokenizer": "r50k_base", "vocab_size": 50257}, 50304)
    result = run_sample(f"--out_dir={out}", "--start", "Hello world", "--r", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("Hello world") and "(r = 2)" in result.stdout


def test_sample_cli_crops_long_prompt_with_a_warning(out_dir):
    result = run_sample(f"--out_dir={out_dir}", "--start", "ab" * 40)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "warning" in result.stderr and "block_size 32" in result.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "r0", "unknown_char", "bad_criterion"])
def test_sample_cli_bad_input_is_one_line(out_dir, tmp_path, case):
    args = {"missing": [f"--out_dir={tmp_path / 'nowhere'}"],
            "corrupt": [f"--out_dir={tmp_path}"],
            "r0": [f"--out_dir={out_dir}", "--r", "0"],
            "unknown_char": [f"--out_dir={out_dir}", "--start", "Hello!"],
            "bad_criterion": [f"--out_dir={out_dir}", "--exit_criterion", "entropy"]}[case]
    if case == "corrupt":
        (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run_sample(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert {"missing": "no checkpoint", "corrupt": "not a readable checkpoint", "r0": "--r", "unknown_char": "'!H'",
            "bad_criterion": "exit_criterion"}[case] in lines[0]


def test_sample_cli_answers_reasoning_problems(tmp_path):
    """A model trained on aligned targets (meta row_len) answers problems at depth r instead of continuing text."""
    chars = "\n012345"
    examples = [[8, "01543225", "01303531"], [3, "450", "451"]]
    meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "row_len": 16, "examples": examples}
    write_checkpoint(tmp_path, meta, len(chars))
    model = tiny_model(vocab_size=len(chars), block_size=32).eval()  # the same seed: the checkpoint's weights
    result = run_sample(f"--out_dir={tmp_path}", "--r", "3", "--init_scale", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for (difficulty, problem, answer), line in zip(examples, lines):
        ids = torch.tensor([[chars.index(c) for c in "\n" + problem]])
        with torch.no_grad():
            logits, _ = model(ids, num_steps=3, init_scale=0.0)
        predicted = "".join(chars[i] for i in logits[0].argmax(-1).tolist())[-len(answer):]
        verdict = "right" if predicted == answer else "wrong"
        shown = predicted.replace("\n", "\\n")
        assert line == f"{problem} -> {shown}  (difficulty {difficulty}, expected {answer}: {verdict})"
    assert "answered at r = 3" in lines[len(examples)]
    own = run_sample(f"--out_dir={tmp_path}", "--start", "0123", "--r", "2")
    assert own.returncode == 0 and own.stdout.startswith("0123 -> ")
    assert len(own.stdout.splitlines()[0].split(" -> ")[1].replace("\\n", "\n")) == 4  # a label per character


def test_generation_stops_once_every_row_has_a_stop_token():
    model = tiny_model().eval()
    idx = prompt(model).repeat(2, 1)  # two identical rows: both reach the stop token at the same step
    full, _ = generate(model, idx, 24, num_steps=2, temperature=0, init_scale=0.0)
    new_full = full[0, idx.size(1):]
    stop = new_full[5].item()
    first = (new_full == stop).nonzero()[0].item()  # where it first appears (index 5 or earlier)
    for use_cache in (True, False):
        out, steps = generate(model, idx, 24, num_steps=2, temperature=0, init_scale=0.0, use_cache=use_cache,
                              stop_ids=[stop])
        assert out.size(1) == idx.size(1) + first + 1 and len(steps) == first + 1
        torch.testing.assert_close(out, full[:, :out.size(1)])  # the same tokens up to there
