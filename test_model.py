"""Tests for model.py: the sampler, the state, the adapter, causality, truncated backprop, sizes. CPU only."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import PRESETS, RecurrentConfig, RecurrentGPT, config_from_preset, sample_num_steps


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RecurrentGPT(config_from_preset("tiny", **overrides))


def batch(model, B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


# --- r sampler -------------------------------------------------------------------------------------------------


def test_sampler_distribution():
    r_bar = 32
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([sample_num_steps(r_bar, generator=g) for _ in range(200_000)], dtype=torch.float64)
    assert abs(r.mean().item() / (r_bar + 1) - 1) < 0.02  # E[r] = E[Poisson(exp tau)] + 1 = r_bar + 1
    assert r.median().item() < r.mean().item()  # heavy right tail
    assert r.min().item() == 1


def test_sampler_fixed_generator_repeats():
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (3, 3, 4))
    seq1 = [sample_num_steps(8, generator=g1) for _ in range(50)]
    seq2 = [sample_num_steps(8, generator=g2) for _ in range(50)]
    seq3 = [sample_num_steps(8, generator=g3) for _ in range(50)]
    assert seq1 == seq2 and seq1 != seq3
    assert len(set(seq1)) > 5  # and it is not constant


# --- the noise-initialised state -----------------------------------------------------------------------------


def test_initial_state_statistics():
    model = tiny_model()
    h = model.config.n_embd
    e = torch.empty(8, 512, h)
    state = model.initial_state(e.shape, generator=torch.Generator().manual_seed(0))
    formula_std = math.sqrt(2 / (5 * h)) * math.sqrt(h)  # sqrt(2/5) before the cut
    assert abs(state.std().item() / formula_std - 1) < 0.03
    assert state.abs().max().item() <= 3 * formula_std + 1e-6  # nothing beyond the +-3 std cut
    assert not torch.equal(state, model.initial_state(e.shape))  # fresh noise per call
    assert torch.count_nonzero(model.initial_state(e.shape, init_scale=0.0)) == 0
    half = model.initial_state(e.shape, init_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert abs(half.std().item() / (0.5 * formula_std) - 1) < 0.03


# --- structure ------------------------------------------------------------------------------------------------


def test_adapter_concat_order_is_state_then_embedding():
    model = tiny_model().eval()
    h = model.config.n_embd
    seen = {}
    model.adapter.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    idx = batch(model)
    rope = model.rope[: idx.size(1)]
    e = model.embed(idx, rope)
    state = torch.randn_like(e)
    eye, zero = torch.eye(h), torch.zeros(h, h)
    with torch.no_grad():
        model.adapter.weight.copy_(torch.cat([eye, zero], dim=1))  # keep the first half only
        model.core_step(state, e, rope)
        torch.testing.assert_close(seen["out"], state)
        model.adapter.weight.copy_(torch.cat([zero, eye], dim=1))  # keep the second half only
        model.core_step(state, e, rope)
        torch.testing.assert_close(seen["out"], e)


def test_embedding_scale_and_ln_f_used_twice():
    model = tiny_model().eval()
    h = model.config.n_embd
    inputs, ln_f_calls = {}, []
    model.prelude[0].norm_1.register_forward_hook(lambda mod, inp, out: inputs.update(x=inp[0]))
    model.ln_f.register_forward_hook(lambda mod, inp, out: ln_f_calls.append(inp[0]))
    idx = batch(model)
    with torch.no_grad():
        model(idx, num_steps=2)
    torch.testing.assert_close(inputs["x"], model.wte(idx) * math.sqrt(h))
    assert len(ln_f_calls) == 2  # after the recurrence, and again after the coda


def test_blocks_norm_the_residual_stream():
    model = tiny_model().eval()
    out = {}
    model.core[-1].register_forward_hook(lambda mod, inp, o: out.update(x=o))
    with torch.no_grad():
        model.core[-1].norm_4.weight.fill_(1.0)
        model(batch(model), num_steps=3)
    rms = out["x"].pow(2).mean(-1).sqrt()  # the state leaving an iteration has unit RMS (sandwich norm_4)
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


def test_rope_rotates_interleaved_pairs_and_encodes_relative_position():
    from model import apply_rope, precompute_rope

    hd, T = 8, 12
    rope = precompute_rope(hd, T, base=50_000.0)
    x = torch.zeros(1, T, 1, hd)
    x[..., 0] = 1.0  # a unit vector in the first pair (x[0], x[1])
    y = apply_rope(x, rope)
    angle = rope[:, 0, 0].acos()  # position * inv_freq[0] = position
    torch.testing.assert_close(y[0, :, 0, 1], torch.sin(torch.arange(T, dtype=torch.float32)))
    assert torch.count_nonzero(y[..., 2:]) == 0  # other pairs untouched: pairs are (2i, 2i+1), not (i, i+hd/2)
    assert angle[1].item() == pytest.approx(1.0, abs=1e-5)
    q, k = torch.randn(1, 1, 1, hd).expand(1, T, 1, hd), torch.randn(1, 1, 1, hd).expand(1, T, 1, hd)
    qr, kr = apply_rope(q, rope), apply_rope(k, rope)
    dots = (qr[0, :, 0] @ kr[0, :, 0].T)  # (T, T): depends only on the offset j - i
    torch.testing.assert_close(dots[2, 5], dots[6, 9])
    torch.testing.assert_close(dots[0, 0], dots[7, 7])


@pytest.mark.parametrize("num_steps", [1, 4])
def test_causality(num_steps):
    model = tiny_model().eval()
    idx = batch(model, T=20)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % model.config.vocab_size
    with torch.no_grad():
        a, _ = model(idx, num_steps=num_steps, init_scale=0.0)
        b, _ = model(changed, num_steps=num_steps, init_scale=0.0)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 12:], b[:, 12:])


# --- r --------------------------------------------------------------------------------------------------------


def test_r_matters_and_zero_state_is_deterministic():
    model = tiny_model().eval()
    idx = batch(model)
    with torch.no_grad():
        r1, _ = model(idx, num_steps=1, init_scale=0.0)
        r4, _ = model(idx, num_steps=4, init_scale=0.0)
        r4_again, _ = model(idx, num_steps=4, init_scale=0.0)
        noisy_a, _ = model(idx, num_steps=4)
        noisy_b, _ = model(idx, num_steps=4)
    assert (r1 - r4).abs().max().item() > 1e-3
    assert torch.equal(r4, r4_again)
    assert not torch.equal(noisy_a, noisy_b)  # fresh noise per call


def test_eval_default_r_is_mean_recurrence():
    model = tiny_model().eval()
    calls = []
    model.adapter.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(batch(model))
    assert len(calls) == model.config.mean_recurrence
    with pytest.raises(ValueError, match="whole number >= 1"):
        model(batch(model), num_steps=0)
    # a fractional r ran the prelude, then failed in range(); a negative or nan noise scale ran from the zero state
    with pytest.raises(ValueError, match="whole number >= 1, got 2.5"):
        model(batch(model), num_steps=2.5)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="init_scale must be a finite number >= 0"):
            model(batch(model), num_steps=1, init_scale=bad)


def test_truncated_backprop_matches_detached_reference():
    k = 2
    model = tiny_model(backprop_depth=k).train()
    idx, targets = batch(model), batch(model, seed=2)
    rope = model.rope[: idx.size(1)]
    state0 = model.initial_state(model.embed(idx, rope).shape, generator=torch.Generator().manual_seed(5))

    grad_enabled_calls = []
    hook = model.adapter.register_forward_hook(lambda *a: grad_enabled_calls.append(torch.is_grad_enabled()))
    _, loss = model(idx, targets, num_steps=k + 5, state=state0.clone())
    hook.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grad_enabled_calls == [False] * 5 + [True] * k  # only the last k core passes are recorded

    # reference: run all k + 5 iterations with autograd, but cut the state after the first 5
    model.zero_grad()
    e = model.embed(idx, rope)
    state = state0.clone()
    for i in range(k + 5):
        state = model.core_step(state, e, rope)
        if i == 4:
            state = state.detach()
    logits = model.predict(state, rope)
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=f"gradient of {n} differs")
    assert grads["prelude.0.attn.Wqkv.weight"].abs().sum() > 0  # the prelude learns through e


def test_training_samples_r_each_call():
    model = tiny_model().train()
    calls = []
    model.adapter.register_forward_hook(lambda *a: calls.append(1))
    counts = []
    for _ in range(20):
        calls.clear()
        model(batch(model))
        counts.append(len(calls))  # iterations run in this call
    assert min(counts) >= 1 and len(set(counts)) > 2


# --- sizes, optimiser, FLOPs -----------------------------------------------------------------------------------


def test_huginn_0125_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = RecurrentGPT(config_from_preset("huginn-0125"))
    assert model.get_num_params() == 3_564_976_800
    cfg = model.config
    assert (cfg.n_layers_prelude, cfg.n_layers_core, cfg.n_layers_coda) == (2, 4, 2)
    assert (cfg.n_embd, cfg.n_head, cfg.intermediate_size, cfg.vocab_size) == (5280, 55, 17920, 65536)
    assert (cfg.block_size, cfg.mean_recurrence, cfg.backprop_depth) == (4096, 32, 8)


def test_small_preset_is_about_96m():
    with torch.device("meta"):
        model = RecurrentGPT(config_from_preset("small"))
    assert 80e6 < model.get_num_params() < 120e6
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("huge")


@pytest.mark.parametrize("bad", [dict(n_layers_prelude=1.5), dict(n_layers_coda="2"), dict(n_layers_prelude=True),
                                 dict(n_layers_coda=-1), dict(n_head=0), dict(n_embd=60, n_head=4)])
def test_a_wrong_shape_fails_in_the_config(bad):
    """Every count of the config is a whole number (a float, a string or a bool got past it and failed, or built a
    model, far from the cause); a shape that cannot be split into heads fails with its reason."""
    with pytest.raises(ValueError, match="must be"):
        RecurrentConfig(**bad)


def test_init_follows_reference():
    model = tiny_model()
    cfg = model.config
    std = math.sqrt(2 / (5 * cfg.n_embd))
    out_std = std / math.sqrt(2 * (cfg.n_layers_prelude + cfg.n_layers_coda + cfg.n_layers_core * cfg.mean_recurrence))
    fc = model.core[0].mlp.fc.weight
    assert fc.abs().max() <= 3 * std and abs(fc.std().item() / std - 1) < 0.05
    proj = model.core[0].attn.proj.weight
    assert proj.abs().max() <= 3 * out_std and abs(proj.std().item() / out_std - 1) < 0.1
    assert torch.count_nonzero(model.core[0].attn.qk_bias) == 0
    assert torch.equal(model.ln_f.weight, torch.ones_like(model.ln_f.weight))
    assert model.lm_head.weight is model.wte.weight  # tied embeddings
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_optimizer_groups():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # the matrices decay (the embedding too, as in the reference); norm weights and the per-head qk_bias do not
    matrices = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {names[id(p)] for p in decay["params"]} == matrices and "wte.weight" in matrices
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters()} - matrices
    assert {"ln_f.weight", "core.0.attn.qk_bias", "core.0.norm_4.weight"} <= {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize("r", [1, 5, 12])  # k = 2: the backward runs over min(r, 2) steps
def test_flops_estimate_matches_counted_matmuls(r):
    model = tiny_model(block_size=32).train()
    idx = batch(model, T=32)
    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = model(idx, idx, num_steps=r)
        loss.backward()
    tokens = idx.numel()
    matmul_only = model.estimate_flops_per_token(r, seq_len=0) * tokens  # the attention term vanishes at T=0
    with_attention = model.estimate_flops_per_token(r, seq_len=32) * tokens
    # torch's counter sees every matmul; whether it counts CPU attention kernels depends on the build
    assert counter.get_total_flops() in (matmul_only, with_attention)
    fwd = FlopCounterMode(display=False)
    with torch.no_grad(), fwd:
        model(idx, num_steps=r)
    assert fwd.get_total_flops() in (model.estimate_flops_per_token(r, seq_len=0, training=False) * tokens,
                                     model.estimate_flops_per_token(r, seq_len=32, training=False) * tokens)
    # frozen weights (as under LoRA; the norms still train, so the backward runs through every layer): the
    # weights' gradients are not computed
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    frozen = FlopCounterMode(display=False)
    with frozen:
        _, loss = model(idx, idx, num_steps=r)
        loss.backward()
    assert frozen.get_total_flops() in (model.estimate_flops_per_token(r, seq_len=0, frozen=True) * tokens,
                                        model.estimate_flops_per_token(r, seq_len=32, frozen=True) * tokens)
    # and nothing before e trains (LoRA on the core and adapter only): the backward never reaches the prelude
    for name, p in model.named_parameters():
        p.requires_grad_(p.dim() == 1 and not name.startswith("prelude"))
    after_e = FlopCounterMode(display=False)
    with after_e:
        _, loss = model(idx, idx, num_steps=r)
        loss.backward()
    assert after_e.get_total_flops() in [model.estimate_flops_per_token(r, seq_len=T, frozen=True, prelude_trains=False)
                                         * tokens for T in (0, 32)]


# --- it learns ------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = tiny_model(seed=0).train()
    idx = batch(model, B=4, T=32)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for step in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


def test_config_defaults_are_the_released_model():
    assert PRESETS["huginn-0125"] == {}
    cfg = RecurrentConfig()
    assert (cfg.rope_base, cfg.norm_eps, cfg.qk_bias, cfg.tie_embeddings) == (50_000.0, 1e-6, True, True)
    assert cfg.sigma == 0.5


def test_compiled_pieces_do_not_recompile_when_r_changes():
    """compile_pieces with the default backend (inductor): 20 training iterations at different r compile nothing
    after the first, because the loop over r is Python calling one compiled core_step."""
    from torch._dynamo.utils import counters

    try:  # the one reason to skip: inductor cannot build kernels here (e.g. no C++ compiler)
        torch.compile(lambda t: t * 2)(torch.ones(2))
    except Exception as err:
        pytest.skip(f"inductor cannot run here: {type(err).__name__}")
    torch._dynamo.reset()
    model = tiny_model().train().compile_pieces()
    opt = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    idx = batch(model, T=16)
    g = torch.Generator().manual_seed(0)
    rs, graphs = [], []
    for i in range(20):
        r = 4 if i == 0 else sample_num_steps(6, generator=g)  # the first call runs steps with and without grad
        _, loss = model(idx, idx, num_steps=r)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rs.append(r)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(rs)) >= 4 and graphs[0] > 0
    assert graphs[-1] == graphs[0], f"graphs compiled per step: {graphs}"


def test_iterate_yields_every_state_of_the_loop():
    """iterate is the one loop: it yields s_1 ... s_r, and forward's logits are predict(s_r)."""
    model = tiny_model().eval()
    idx = batch(model)
    rope = model.rope[: idx.size(1)]
    with torch.no_grad():
        e = model.embed(idx, rope)
        s0 = model.initial_state(e.shape, init_scale=0.0)
        states = list(model.iterate(s0, e, rope, num_steps=5))
        assert len(states) == 5
        torch.testing.assert_close(states[0], model.core_step(s0, e, rope), atol=0, rtol=0)
        torch.testing.assert_close(states[3], model.core_step(states[2], e, rope), atol=0, rtol=0)
        logits, _ = model(idx, num_steps=5, init_scale=0.0)
        torch.testing.assert_close(logits, model.predict(states[-1], rope), atol=0, rtol=0)
