"""Tests for decode.py: the static KV cache against full forward passes, early exit (per row), the latest-entry rule,
the cache budget, warm start, self-speculative decoding and its rollback, the compiled step. CPU only."""

import pytest
import torch
import torch.nn.functional as F

from decode import ExitRule, KVCache, LatentDiff, compile_for_decoding, forward_cached, generate
from model import RecurrentGPT, config_from_preset

torch.set_num_threads(1)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    # two core layers, so that the cache's (step, layer) bookkeeping is exercised
    return RecurrentGPT(config_from_preset("tiny", **{"n_layers_core": 2, "block_size": 128, **overrides})).eval()


def prompt(model, T=8, seed=1, B=1):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def noise_table(model, B, length, seed=3):
    g = torch.Generator().manual_seed(seed)
    return model.initial_state((B, length, model.config.n_embd), generator=g)


PATTERN = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # a repeating sequence the trained model learns to continue


@pytest.fixture(scope="module")
def trained_model():
    """The tiny model trained briefly (with the usual random r) to continue PATTERN; a few seconds."""
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


# --- the static cache reproduces forward ----------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 8])
def test_cached_logits_equal_a_full_forward_pass(r):
    model = tiny_model()
    idx = prompt(model, T=40)
    noise = noise_table(model, 1, 64)
    full, _ = model(idx, num_steps=r, state=noise[:, :40])  # (1, T, vocab), the same s_0 at every position
    cache = KVCache(model, 1, 64, r)
    with torch.no_grad():
        logits, _, _ = forward_cached(model, idx[:, :10], cache, r, noise)  # a prompt of 10, then one by one
        torch.testing.assert_close(logits, full[:, :10], atol=1e-4, rtol=0)
        for t in range(10, 40):
            logits, _, steps = forward_cached(model, idx[:, t:t + 1], cache, r, noise)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-4, rtol=0)
            assert steps.tolist() == [r]
    assert cache.pos == 40 and cache.core_kv[0][0].shape == (r, 1, 4, 64, 16)  # (steps, B, nh, max_len, hd)


@pytest.mark.parametrize("r", [1, 8])
def test_cached_greedy_decoding_equals_recomputing(r):
    model = tiny_model()
    idx = prompt(model)
    # init_scale=0: the zero start state, so both paths see the same s_0 at every position
    cached, stats = generate(model, idx, 64, num_steps=r, temperature=0, init_scale=0)
    assert cached.shape == (1, 8 + 64) and stats["steps"].tolist() == [[r] * 64]
    recomputed = idx
    with torch.no_grad():
        for _ in range(64):
            logits, _ = model(recomputed, num_steps=r, init_scale=0)
            recomputed = torch.cat([recomputed, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, recomputed)


def test_context_longer_than_block_size_keeps_decoding():
    """A full context starts again from its last block_size / 2 tokens (nanoGPT crops, in halves): greedy decoding
    equals recomputing each token from that context, through several crops."""
    model = tiny_model(block_size=32)
    out, stats = generate(model, prompt(model, T=30), 40, num_steps=2, temperature=1.0)
    assert out.shape == (1, 70) and stats["steps"].shape == (1, 40)
    cached, _ = generate(model, prompt(model, T=30), 40, num_steps=2, temperature=0, init_scale=0)
    idx, context = prompt(model, T=30), prompt(model, T=30)
    with torch.no_grad():
        for _ in range(40):
            new = model(context, num_steps=2, init_scale=0)[0][:, -1:].argmax(-1)
            idx, context = torch.cat([idx, new], dim=1), torch.cat([context, new], dim=1)
            context = context[:, -16:] if context.size(1) > 32 else context
    assert torch.equal(cached, idx)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompt(model, T=33), 1)


def test_cache_dtype_under_bf16_autocast():
    """Under autocast with float32 weights keys and values are both bf16 (the qk_bias add and RoPE would otherwise
    promote the keys to float32: twice the memory and a cast of the whole cache every step)."""
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(model, 1, 16, 2)
        with torch.no_grad():
            forward_cached(model, prompt(model, T=4), cache, 2, noise_table(model, 1, 16))
    for k, v in cache.prelude_kv + cache.core_kv + cache.coda_kv:
        assert k.dtype == v.dtype == torch.bfloat16
        assert k.abs().sum() > 0  # written


# --- early exit -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_threshold_zero_never_exits(criterion):
    model = tiny_model()
    idx = prompt(model)
    runs = [generate(model, idx, 32, num_steps=6, temperature=1.0, exit_criterion=c, exit_threshold=0.0,
                     generator=torch.Generator().manual_seed(5)) for c in ("none", criterion)]
    (fixed, fixed_stats), (adaptive, adaptive_stats) = runs
    assert torch.equal(fixed, adaptive)
    assert fixed_stats["steps"].tolist() == adaptive_stats["steps"].tolist() == [[6] * 32]


@pytest.mark.parametrize("criterion", ["kl", "latent-diff", "confident-run"])
def test_default_threshold_exits_early_on_trained_model(trained_model, criterion):
    r = 16  # above confident-run's default of 10 steps in a row
    idx = torch.tensor([PATTERN[:5]])
    out, stats = generate(trained_model, idx, 48, num_steps=r, temperature=0, exit_criterion=criterion)
    mean_steps = stats["steps"].float().mean().item()
    print(f"{criterion}: mean {mean_steps:.2f} steps per token at r = {r}")
    assert mean_steps < r and stats["steps"].min() >= 1
    expected = torch.tensor(PATTERN * 5)[:out.size(1)]
    assert (out[0] == expected).float().mean() > 0.9  # exiting early kept the continuation right


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_each_row_of_a_batch_exits_on_its_own(trained_model, criterion):
    """Two rows decoded together give what each gives alone: the same tokens and the same steps per token, each
    row with the logits of its own exit step (not the slowest row's)."""
    rows = torch.tensor([PATTERN[:5], [0, 0, 0, 0, 0]])  # a familiar start and a strange one
    kwargs = dict(num_steps=8, temperature=0, exit_criterion=criterion, init_scale=0)
    together, together_stats = generate(trained_model, rows, 24, **kwargs)
    steps_differ = False
    for b in range(2):
        alone, alone_stats = generate(trained_model, rows[b:b + 1], 24, **kwargs)
        assert torch.equal(together[b], alone[0])
        assert together_stats["steps"][b].tolist() == alone_stats["steps"][0].tolist()
        steps_differ |= together_stats["steps"][b].tolist() != together_stats["steps"][1 - b].tolist()
    assert steps_differ  # the rows really exited at different steps


def test_exited_token_is_read_at_its_last_step():
    """A token that stopped after s < r steps is read by later tokens, at the steps it skipped, through its entry
    of step s for the same core layer (the reference's latest-m4)."""
    model = tiny_model()
    idx, r, noise = prompt(model, T=5), 5, noise_table(model, 1, 16)
    exited, full = KVCache(model, 1, 16, r), KVCache(model, 1, 16, r)
    with torch.no_grad():
        for cache in (exited, full):
            forward_cached(model, idx[:, :4], cache, r, noise)
        # an infinite threshold stops position 4 at the first check, after one step
        _, _, steps = forward_cached(model, idx[:, 4:5], exited, r, noise, rule=LatentDiff(float("inf")))
        forward_cached(model, idx[:, 4:5], full, r, noise)
    assert steps.tolist() == [1]
    for (k, v), (k_full, v_full) in zip(exited.core_kv, full.core_kv):
        for step in range(r):
            assert torch.equal(k[step, :, :, :4], k_full[step, :, :, :4])  # earlier tokens: untouched
            assert torch.equal(k[step, :, :, 4], k_full[0, :, :, 4])  # its one step's entry, at every step
            assert torch.equal(v[step, :, :, 4], v_full[0, :, :, 4])
        assert not torch.equal(k_full[r - 1, :, :, 4], k_full[0, :, :, 4])  # a token that ran every step has its own
    # stopping after s = 3 steps: the skipped steps 3 and 4 read step 3's entry (slot 2), the others keep theirs
    before = [k.clone() for k, _ in full.core_kv]
    full.pos = 4
    full.start(1)
    full.fill_after_exit(0, 3, r, full.exit_entries(0, 3))
    for k, k_before in zip([k for k, _ in full.core_kv], before):
        assert torch.equal(k[:3], k_before[:3])
        assert torch.equal(k[3, :, :, 4], k_before[2, :, :, 4]) and torch.equal(k[4, :, :, 4], k_before[2, :, :, 4])


def test_the_gate_follows_the_model_to_its_device():
    """exit_gate.pt is read (and exits.py fits it) on the CPU; its features come from where the model runs (the
    meta device stands in for a GPU here: CI has none)."""
    from decode import Gate, gate_net
    gate = Gate(0.01, gate_net(8), torch.zeros(19), torch.ones(19))
    gate.start(torch.zeros(3, 16, device="meta"))  # a token's s_0 (B, h)
    assert gate.settled(torch.zeros(3, 19, device="meta")).shape == (3,)


def test_the_gate_keeps_its_threshold_under_bf16_autocast():
    """A gate that always says 0.995 never passes 1 - 0.003; under bf16 autocast (sample.py on a GPU) it stopped
    every token at its first step: its MLP ran in bf16, and 0.997 rounded to 0.996."""
    from decode import gate_net
    model, net = tiny_model(), gate_net(8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net[2].bias.fill_(5.29)  # sigmoid(5.29) = 0.9950
    model.exit_gate = {"net": net, "mean": torch.zeros(19), "std": torch.ones(19)}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, stats = generate(model, prompt(model), 4, num_steps=6, temperature=0, exit_criterion="gate")
        assert stats["steps"].tolist() == [[6] * 4], autocast


class StopAt(ExitRule):
    """Row b is done after steps[b] steps, whatever its state."""

    def done(self, step, state, log_probs):
        return torch.tensor([step >= s for s in self.threshold])


@pytest.mark.parametrize("steps_kept", [None, 1, 3])
def test_a_row_that_exits_leaves_the_cache_it_would_alone(steps_kept):
    """Row 0 stops after 2 of 8 steps while row 1 runs all 8: the core keeps writing row 0's buffers for the
    batch, and under a cache budget reuses the buffer of its exit step. The next token still reads row 0's exit
    step, as it would decoding alone."""
    model, r = tiny_model(), 8
    idx, noise = prompt(model, T=6).repeat(2, 1), noise_table(model, 1, 16).repeat(2, 1, 1)
    budget = steps_kept and steps_kept * model.config.n_layers_core
    logits = []
    for rows, stops in ((slice(0, 1), [2]), (slice(0, 2), [2, r])):  # alone, then in a batch of two
        cache = KVCache(model, len(stops), 16, r, cache_budget=budget)
        with torch.no_grad():
            forward_cached(model, idx[rows, :4], cache, r, noise[rows])
            forward_cached(model, idx[rows, 4:5], cache, r, noise[rows], rule=StopAt(stops))
            logits.append(forward_cached(model, idx[rows, 5:6], cache, r, noise[rows])[0][0])
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


# --- cache budget ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 3, 8, 16])
def test_cache_budget_bounds_core_entries(r):
    model = tiny_model()
    idx = prompt(model)
    budget = 4  # two steps of two core layers
    cache = KVCache(model, 1, 16, r, cache_budget=budget)
    assert sum(k.size(0) for k, _ in cache.core_kv) == budget  # not r * n_layers_core
    out, stats = generate(model, idx, 16, num_steps=r, temperature=0, cache_budget=budget)
    assert out.shape == (1, 24) and stats["steps"].tolist() == [[r] * 16]
    # step i lives in buffer i mod 2: after the prompt, each buffer holds the last step with its residue
    full, noise = KVCache(model, 1, 16, r), noise_table(model, 1, 16)
    with torch.no_grad():
        for c in (cache, full):
            forward_cached(model, idx, c, r, noise)
    for (k, v), (k_full, v_full) in zip(cache.core_kv, full.core_kv):
        for j in range(min(r, 2)):
            last = max(i for i in range(r) if i % 2 == j)
            assert torch.equal(k[j], k_full[last]) and torch.equal(v[j], v_full[last])
    with pytest.raises(ValueError, match="multiple of n_layers_core"):
        generate(model, idx, 1, num_steps=r, cache_budget=3)


def test_budget_of_every_entry_changes_nothing():
    model = tiny_model()
    idx = prompt(model)
    r, L = 3, model.config.n_layers_core
    full, _ = generate(model, idx, 32, num_steps=r, temperature=0, init_scale=0)
    budgeted, _ = generate(model, idx, 32, num_steps=r, temperature=0, init_scale=0, cache_budget=r * L)
    assert torch.equal(full, budgeted)


# --- warm start -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm_start", [True, False])
def test_warm_start_begins_at_previous_final_state(warm_start):
    model = tiny_model()
    idx = prompt(model, T=4)
    r, calls = 3, []
    core_step = model.core_step

    def recording_core_step(state, e, rope, kv=None):
        out = core_step(state, e, rope, kv)
        calls.append((state, out))
        return out

    model.core_step = recording_core_step
    generate(model, idx, 5, num_steps=r, warm_start=warm_start)
    # the prompt's pass (4 positions) makes r calls and gives the first token; each of the next 4 makes r calls
    assert len(calls) == r * 5 and all(calls[r * i][0].size(1) == 1 for i in range(1, 5))
    for i in range(1, 5):
        first_input, previous_final = calls[r * i][0], calls[r * i - 1][1][:, -1:]
        assert torch.equal(first_input, previous_final) == warm_start


# --- self-speculative decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_steps,lookahead", [(2, 4), (1, 3)])
def test_speculative_greedy_equals_plain_greedy(draft_steps, lookahead):
    model = tiny_model()
    idx = prompt(model, B=2)
    seed = lambda: torch.Generator().manual_seed(7)  # the same noise starts s_0 per position in both runs
    plain, _ = generate(model, idx, 40, num_steps=6, temperature=0, generator=seed())
    fast, stats = generate(model, idx, 40, num_steps=6, temperature=0, generator=seed(), draft_steps=draft_steps,
                           lookahead=lookahead)
    assert torch.equal(plain, fast)
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]


def test_speculation_crops_where_plain_greedy_does():
    """Near a full context a round checks only the drafts the cache has room for, then plain steps: the context is
    cropped at the same token as in plain decoding, so the output stays exactly greedy (several crops here). A cache
    budget below r is refused: a check of several tokens in one pass would read other entries."""
    model = tiny_model(vocab_size=16, block_size=24)
    for seed in range(6):
        idx = prompt(model, T=6 + 3 * seed, seed=seed)
        plain, _ = generate(model, idx, 40, num_steps=4, temperature=0, init_scale=0)
        fast, stats = generate(model, idx, 40, num_steps=4, temperature=0, init_scale=0, draft_steps=1, lookahead=4)
        assert torch.equal(plain, fast) and stats["steps"].shape == (1, 40)
    with pytest.raises(ValueError, match="cache budget"):
        generate(model, idx, 4, num_steps=4, temperature=0, draft_steps=1, cache_budget=2)


def test_speculation_draws_the_noise_plain_decoding_draws():
    """At init_scale=1 too, speculation is exactly greedy decoding at r, and so is a second call on the same
    generator: the noise table's shape does not depend on the lookahead (it once had the cache's length, which
    rounds T + 52 + 1 up to 64 positions and T + 52 + 5 to 128)."""
    model = tiny_model()
    idx = prompt(model, B=2)
    runs = []
    for kwargs in (dict(), dict(draft_steps=2, lookahead=4)):
        g = torch.Generator().manual_seed(7)  # one generator for both calls, as sample.py's num_samples
        runs.append([generate(model, idx, 52, num_steps=6, temperature=0, generator=g, **kwargs)[0] for _ in range(2)])
    (plain, plain_again), (fast, fast_again) = runs
    assert torch.equal(plain, fast)
    assert torch.equal(plain_again, fast_again)
    assert not torch.equal(plain, plain_again)  # the second call drew other noise, and the tokens follow it


def test_speculation_drafts_nothing_past_max_new_tokens():
    """A round gives its drafts and one token more: with one token left it drafts none, with two, one."""
    model = tiny_model()
    idx = prompt(model)
    plain, _ = generate(model, idx, 2, num_steps=4, temperature=0, init_scale=0)
    for n, drafts in ((1, 0), (2, 1)):
        fast, stats = generate(model, idx, n, num_steps=4, temperature=0, init_scale=0, draft_steps=1)
        assert torch.equal(fast, plain[:, :idx.size(1) + n])
        assert stats["drafted"] == drafts and stats["accepted"] <= drafts and stats["steps"].shape == (1, n)


def test_speculation_accepts_drafts_of_a_trained_model(trained_model):
    idx = torch.tensor([PATTERN[:5]])
    plain, _ = generate(trained_model, idx, 48, num_steps=16, temperature=0, init_scale=0)
    fast, stats = generate(trained_model, idx, 48, num_steps=16, temperature=0, init_scale=0, draft_steps=2)
    assert torch.equal(plain, fast)
    assert stats["accepted"] / stats["drafted"] > 0.5, stats  # r = 2 already predicts the pattern


def test_rollback_after_a_rejected_draft_leaves_the_cache_of_plain_decoding():
    """Drafts the check rejects were written into the cache; after the rollback, every position below cache.pos
    holds what plain decoding writes there, at every step of every layer."""
    model = tiny_model()
    idx, r, noise = prompt(model), 5, noise_table(model, 1, 64)
    from decode import speculative_round
    spec, plain = KVCache(model, 1, 64, r), KVCache(model, 1, 64, r)
    rejected = 0
    with torch.no_grad():
        logits, _, _ = forward_cached(model, idx, spec, r, noise, last=True)
        forward_cached(model, idx, plain, r, noise)
        tokens, logits = idx, logits[:, -1]
        for _ in range(6):
            new, logits, kept = speculative_round(model, logits, spec, noise, r, draft_steps=1, lookahead=4)
            rejected += kept < 4
            tokens = torch.cat([tokens, new], dim=1)
        for t in range(idx.size(1), tokens.size(1)):  # plain decoding of the same tokens
            forward_cached(model, tokens[:, t:t + 1], plain, r, noise)
    assert rejected > 0 and spec.pos == plain.pos == tokens.size(1)
    for (k, v), (k_plain, v_plain) in zip(spec.prelude_kv + spec.core_kv + spec.coda_kv,
                                          plain.prelude_kv + plain.core_kv + plain.coda_kv):
        torch.testing.assert_close(k[..., :spec.pos, :], k_plain[..., :plain.pos, :], atol=1e-5, rtol=0)
        torch.testing.assert_close(v[..., :spec.pos, :], v_plain[..., :plain.pos, :], atol=1e-5, rtol=0)


# --- the compiled step ----------------------------------------------------------------------------------------


def test_compiled_step_never_recompiles():
    """64 tokens at each of r = 4, 8, 32, with and without the kl exit, through one set of compiled graphs.
    Whether a call recompiles is decided by dynamo's guards before any backend runs, so the graphs are captured
    with the "eager" backend here (inductor would take a minute; test_compiled_decoding_matches_eager runs it)."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_model()
    idx = prompt(model)
    compile_for_decoding(model, backend="eager")
    generate(model, idx, 64, num_steps=4, compile=True)  # compiles embed, core_step, predict
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3
    for r in (4, 8, 32):
        for criterion in ("none", "kl"):
            _, stats = generate(model, idx, 64, num_steps=r, compile=True, exit_criterion=criterion,
                                exit_threshold=1e-2)
    assert counters["stats"]["unique_graphs"] == graphs  # new positions, r and exit points: no new graph
    assert stats["steps"].float().mean() < 32  # the kl run did exit early


def test_compiled_decoding_matches_eager():
    """The real thing, inductor with frozen weights: the same greedy tokens as eager decoding."""
    try:  # the one reason to skip: inductor cannot build kernels here (e.g. no C++ compiler)
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as err:
        pytest.skip(f"inductor cannot run here: {type(err).__name__}")
    model = tiny_model()
    idx = prompt(model)
    seed = lambda: torch.Generator().manual_seed(11)
    eager, _ = generate(model, idx, 24, num_steps=4, temperature=0, generator=seed())
    compile_for_decoding(model)
    compiled, _ = generate(model, idx, 24, num_steps=4, temperature=0, generator=seed())
    assert torch.equal(eager, compiled)
    # frozen in: the compiled one-token step keeps the weights of its first call (the 3-5x of compiling on a CPU),
    # while the prompt's pass (eager) reads the new ones, so the tokens now differ from plain eager decoding's
    with torch.no_grad():
        for p in model.core.parameters():
            p.mul_(-1)
    eager_model = tiny_model()
    eager_model.load_state_dict(model.state_dict())
    changed, _ = generate(eager_model, idx, 24, num_steps=4, temperature=0, generator=seed())
    assert not torch.equal(generate(model, idx, 24, num_steps=4, temperature=0, generator=seed())[0], changed)


def test_top_k_zero_samples_from_every_token():
    """top_k=0 is sample.py's "every token" in generate too (it was an IndexError from torch.topk's empty result)."""
    from decode import sample_next
    logits = torch.randn(2, 50)
    draw = lambda k: sample_next(logits, 1.0, k, torch.Generator().manual_seed(0))
    assert torch.equal(draw(0), draw(None)) and not torch.equal(draw(1), draw(None))


def test_a_tiny_temperature_is_nearly_greedy():
    """A positive temperature too small for the logits divided by it (1e-40: float32's inf) samples the argmax, as
    the limit of sampling does; it was a RuntimeError from torch.multinomial on softmax's nan."""
    from decode import sample_next
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    for top_k in (None, 2):
        assert sample_next(logits, 1e-40, top_k, torch.Generator().manual_seed(0)).flatten().tolist() == [1, 0]


def test_first_step_seconds_include_the_prompts_pass(monkeypatch):
    """sample.py --compile reports first_step_seconds as the compile time: a 1-token prompt compiles in the prompt's
    pass (the one-token step's length), so the figure starts before it (it started after, and said 2 s of 60). None
    when no step follows the prompt's pass (sample.py printed None with :.1f and crashed)."""
    import time
    import decode
    model, slow = tiny_model(), decode.prefill_cache
    monkeypatch.setattr(decode, "prefill_cache", lambda *args: (time.sleep(0.3), slow(*args))[1])
    _, stats = generate(model, prompt(model, T=1), 3, num_steps=2, temperature=0)
    assert stats["first_step_seconds"] >= 0.3
    assert generate(model, prompt(model, T=1), 1, num_steps=2, temperature=0)[1]["first_step_seconds"] is None


def test_generation_stops_once_every_row_has_a_stop_token():
    model = tiny_model()
    idx = prompt(model).repeat(2, 1)  # two identical rows: both reach the stop token at the same step
    full, _ = generate(model, idx, 24, num_steps=2, temperature=0, init_scale=0.0)
    new_full = full[0, idx.size(1):]
    stop = new_full[5].item()
    first = (new_full == stop).nonzero()[0].item()  # where it first appears (index 5 or earlier)
    for draft_steps in (0, 1):
        out, stats = generate(model, idx, 24, num_steps=2, temperature=0, init_scale=0.0, stop_ids=[stop],
                              draft_steps=draft_steps)
        assert out.size(1) == idx.size(1) + first + 1 and stats["steps"].size(1) == first + 1
        torch.testing.assert_close(out, full[:, :out.size(1)])  # the same tokens up to there


def test_confident_run_stops_once_the_prediction_has_held(trained_model):
    """confident-run stops a token at the first step where the same argmax has had top probability >= 0.9 for m
    steps in a row. The first new token comes from the prompt's full-depth pass; the second from the first new
    token's pass, which may exit, and a plain forward over the prompt and that token shows its prediction at every
    step."""
    from decode import CONFIDENT
    r, m = 16, 3
    out, stats = generate(trained_model, torch.tensor([PATTERN[:6]]), 2, num_steps=r, temperature=0, init_scale=0,
                          exit_criterion="confident-run", exit_threshold=m)
    idx = out[:, :7]
    rope = trained_model.rope[:idx.size(1)]
    with torch.no_grad():
        e = trained_model.embed(idx, rope)
        probs = [F.softmax(trained_model.predict(s, rope)[0, -1], -1)
                 for s in trained_model.iterate(trained_model.initial_state(e.shape, 0.0), e, rope, r)]
    run, previous, expected = 0, None, r
    for step, p in enumerate(probs, start=1):
        confident = bool(p.max() >= CONFIDENT)
        run = run + 1 if confident and p.argmax() == previous else int(confident)
        previous = p.argmax()
        if run >= m:
            expected = step
            break
    assert expected < r and stats["steps"].tolist() == [[r, expected]]


# --- prompts of different lengths in one batch ----------------------------------------------------------------


@pytest.mark.parametrize("criterion,budget", [("none", None), ("kl", None), ("confident-run", None), ("none", 4),
                                              ("kl", 4)])
def test_prompts_of_different_lengths_decode_as_if_alone(trained_model, criterion, budget):
    """Prompts of 1, 5 and 17 tokens padded on the left into one batch: every row gives the tokens and the steps
    it gives alone (its own positions, its own exits, no attention to the padding)."""
    from decode import pad_prompts
    prompts = [[3], PATTERN[:5], (PATTERN * 2)[2:19]]
    idx, lengths = pad_prompts(prompts, pad_id=7)
    kwargs = dict(num_steps=8, temperature=0, init_scale=0, exit_criterion=criterion, cache_budget=budget)
    together, stats = generate(trained_model, idx, 20, lengths=lengths, **kwargs)
    for b, p in enumerate(prompts):
        alone, alone_stats = generate(trained_model, torch.tensor([p]), 20, **kwargs)
        assert together[b, idx.size(1):].tolist() == alone[0, len(p):].tolist()
        assert stats["steps"][b].tolist() == alone_stats["steps"][0].tolist()


def test_batched_logits_equal_alone_and_padding_is_never_read():
    """The cached logits of each padded row equal its own run within 1e-5, and what fills the padding changes
    nothing at all (it is masked, not merely small)."""
    from decode import pad_prompts
    model = tiny_model()
    prompts = [prompt(model, T=t, seed=t)[0].tolist() for t in (1, 5, 17)]
    noise = torch.zeros(3, 64, model.config.n_embd)

    def decode_steps(idx, lengths, B):
        cache = KVCache(model, B, 64, 4, first=idx.size(1) - lengths)
        with torch.no_grad():
            logits, _, _ = forward_cached(model, idx, cache, 4, noise[:B], last=True)
            out, token = [logits[:, -1]], logits[:, -1:].argmax(-1)
            for _ in range(6):
                logits, _, _ = forward_cached(model, token, cache, 4, noise[:B])
                out.append(logits[:, -1])
                token = logits.argmax(-1)
        return torch.stack(out, dim=1)  # (B, 7, vocab)

    idx, lengths = pad_prompts(prompts, pad_id=0)
    together = decode_steps(idx, lengths, 3)
    other_padding, _ = pad_prompts(prompts, pad_id=50)
    assert torch.equal(decode_steps(other_padding, lengths, 3), together)
    for b, p in enumerate(prompts):
        alone = decode_steps(torch.tensor([p]), torch.tensor([len(p)]), 1)
        torch.testing.assert_close(together[b], alone[0], atol=1e-5, rtol=0)


def test_a_row_sees_the_noise_it_sees_alone():
    """At init_scale=1 every row of a padded batch gives the tokens it gives alone with the same seed: the rows
    share one noise table, each reading it at its own positions (not at the batch's indices), and it is drawn 64
    positions at a time (the batch's table holds 128 positions here, the shortest row's alone 64). At r = 2 the
    tokens follow the noise: another seed changes them."""
    from decode import pad_prompts
    model = tiny_model()
    prompts = [prompt(model, T=t, seed=t)[0].tolist() for t in (1, 5, 17)]
    idx, lengths = pad_prompts(prompts)
    run = lambda x, seed, **kwargs: generate(model, x, 50, num_steps=2, temperature=0, **kwargs,
                                             generator=torch.Generator().manual_seed(seed))[0]
    together = run(idx, 5, lengths=lengths)
    assert not torch.equal(together, run(idx, 6, lengths=lengths))
    for b, p in enumerate(prompts):
        assert together[b, idx.size(1):].tolist() == run(torch.tensor([p]), 5)[0, len(p):].tolist()


def test_noise_after_a_crop_is_at_each_rows_new_positions():
    """A padded batch decoded past block_size: each token equals a full forward pass over its row's context at the
    time (the batch's last block_size / 2 positions after a crop, less the row's padding) from the table's first
    entries: a crop moves a row's positions, and its noise with them."""
    from decode import noise_table, pad_prompts
    model = tiny_model(block_size=32)
    prompts = [prompt(model, T=t, seed=t)[0].tolist() for t in (3, 10)]
    idx, lengths = pad_prompts(prompts)
    out, _ = generate(model, idx, 30, num_steps=2, temperature=0, lengths=lengths,
                      generator=torch.Generator().manual_seed(4))
    table = noise_table(model, 32, generator=torch.Generator().manual_seed(4))  # generate's
    first, start = idx.size(1) - lengths, 0  # each row's padding; where the batch's context starts
    expected = idx
    with torch.no_grad():
        for _ in range(30):
            new = []
            for b in range(2):
                context = expected[b:b + 1, max(start, int(first[b])):]  # (1, t): the row's own tokens
                logits, _ = model(context, num_steps=2, state=table[None, :context.size(1)])
                new.append(logits[:, -1].argmax(-1))
            expected = torch.cat([expected, torch.stack(new)], dim=1)
            start = expected.size(1) - 16 if expected.size(1) - start > 32 else start  # crop as generate does
    assert start > 0 and torch.equal(out, expected)


def test_each_row_stops_at_its_own_stop_token():
    from decode import pad_prompts
    model = tiny_model()
    prompts = [prompt(model, T=t, seed=t)[0].tolist() for t in (3, 6)]
    idx, lengths = pad_prompts(prompts)
    free, _ = generate(model, idx, 16, num_steps=2, temperature=0, init_scale=0, lengths=lengths)
    stop = free[0, idx.size(1) + 2].item()  # the first row's third new token
    out, stats = generate(model, idx, 16, num_steps=2, temperature=0, init_scale=0, lengths=lengths, stop_ids=[stop])
    first = (free[0, idx.size(1):] == stop).nonzero()[0].item() + 1
    assert stats["lengths"][0] == first and out[0, idx.size(1) + first:].eq(stop).all()  # padded with the stop
    row = free[1, idx.size(1):]
    expected = (row == stop).nonzero()[0].item() + 1 if (row == stop).any() else out.size(1) - idx.size(1)
    assert stats["lengths"][1] == expected
    assert out[1, idx.size(1):idx.size(1) + expected].tolist() == row[:expected].tolist()
    with pytest.raises(ValueError, match="prompts of one length"):
        generate(model, idx, 4, temperature=0, draft_steps=1, lengths=lengths)
