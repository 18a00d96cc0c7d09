"""linear_kernels.py and model.Linear: the forms of the Linear layers decoding uses (int8 weights, oneDNN-packed float
weights, few-row products), each against the plain model. CPU only."""

import copy
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linear_kernels
from decode import KVCache, compile_for_decoding, forward_cached, generate
from linear_kernels import Int8Embedding, Int8Linear, PackedLinear, quantize_int8
from model import Linear, RecurrentGPT, config_from_preset

torch.set_num_threads(1)
PATTERN = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RecurrentGPT(config_from_preset("tiny", **{"n_layers_core": 2, "block_size": 128, **overrides})).eval()


@pytest.fixture(scope="module")
def trained_model():
    """The tiny model trained briefly to continue PATTERN (as in test_decode.py)."""
    model = tiny_model(vocab_size=16)
    model.train()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    stream, g = torch.tensor(PATTERN).repeat(50), torch.Generator().manual_seed(0)
    for _ in range(80):
        ix = torch.randint(0, len(stream) - 33, (16,), generator=g)
        _, loss = model(torch.stack([stream[i:i + 32] for i in ix]), torch.stack([stream[i + 1:i + 33] for i in ix]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_few_row_product_is_the_plain_product():
    """model.Linear takes (W x^T)^T for a few rows: the same numbers as F.linear, gradients included."""
    layer = Linear(64, 256)
    for rows in (1, 2, 7, 64, 65):  # 1 and > out/4 take F.linear itself
        x = torch.randn(1, rows, 64, requires_grad=True)
        y = layer(x)
        assert y.shape == (1, rows, 256) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, layer.weight), atol=1e-5, rtol=0)
        y.square().sum().backward()
        expected = torch.autograd.grad(F.linear(x, layer.weight).square().sum(), x)[0]
        torch.testing.assert_close(x.grad, expected, atol=1e-4, rtol=0)


def test_int8_rows_do_not_depend_on_the_batch():
    """fbgemm rounds its whole input with one scale; Int8Linear gives every row its own grid, so a token's result
    is the same alone as beside others of very different size."""
    linear = nn.Linear(96, 40, bias=False)
    layer = Int8Linear(linear)
    x = torch.randn(6, 96) * torch.tensor([1e-3, 1, 10, 100, 0.1, 5])[:, None]
    together = layer(x)
    alone = torch.cat([layer(row[None]) for row in x])
    torch.testing.assert_close(together, alone, atol=0, rtol=1e-6)
    # and near the float product: what is lost is the rounding of weights and inputs
    exact = F.linear(x, linear.weight)
    assert ((together - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05
    # the input's rounding alone, against the int8 weights' exact product: ~14 bits (7 + 7), whatever the signs
    int8, scale = linear_kernels.int8_rows(linear.weight)
    for signs in (1, -1, torch.tensor([1, -1, 1, -1, 1, -1])[:, None]):
        y, exact = layer(x.abs() * signs), F.linear(x.abs() * signs, int8.float() * scale[:, None])
        assert ((y - exact).norm(dim=1) / exact.norm(dim=1)).max() < 5e-4


def test_int8_inputs_halfway_between_steps():
    """A row of an int8 embedding (k / 127 of its max) puts half its entries exactly halfway between two steps of
    fbgemm's input grid; the second piece must start from fbgemm's own rounding of them (torch.round went the other
    way on some: an error of 0.013 of the product, where the rest is ~1e-4)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    layer = Int8Linear(linear)
    int8, scale = linear_kernels.int8_rows(linear.weight)
    x = torch.randint(-127, 128, (32, 128)).float()
    x[:, 0] = 127  # each row's max: its entries are k / 127 of it
    x = x * 0.0123
    exact = F.linear(x, int8.float() * scale[:, None])
    assert ((layer(x) - exact).norm(dim=1) / exact.norm(dim=1)).max() < 2e-4


def test_gptq_rows():
    """GPTQ keeps int8_rows' scales and range; with inputs that never move together (a diagonal X^T X) no column can
    make up for another, and it is rounding to nearest; with correlated inputs (real activations are) the layer's
    outputs on them are much closer to float32's than rounding to nearest gives."""
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    nearest, scale = linear_kernels.int8_rows(weight)
    int8, gptq_scale = linear_kernels.gptq_rows(weight, torch.diag(torch.rand(64) + 0.5), block=16)
    assert torch.equal(int8, nearest) and torch.equal(gptq_scale, scale)
    x = torch.randn(2048, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(2048, 64)  # (rows, in): 8 directions
    int8, gptq_scale = linear_kernels.gptq_rows(weight, x.T @ x, block=16)  # blocks of columns: the same as one block
    assert torch.equal(int8, linear_kernels.gptq_rows(weight, x.T @ x, block=64)[0]) and int8.abs().max() <= 127
    error = {name: (x @ (w.float() * scale[:, None] - weight).T).norm() for name, w in (("nearest", nearest),
                                                                                       ("gptq", int8))}
    assert error["gptq"] < 0.5 * error["nearest"], error


def test_calibrated_int8_is_closer_to_float(trained_model):
    """calibration_hessians runs the model at r = 1, 2, 4, ... r_bar with a hook on every Linear and takes the hooks
    off; quantize_int8 with them fits each layer, and the int8 model's logits on such tokens (not the calibration
    ones) are closer to float32's than with every weight rounded to nearest, at a short r and at r_bar."""
    model = trained_model
    stream = torch.tensor(PATTERN * 8)
    calibration = torch.stack([stream[i:i + 32] for i in range(0, 48, 3)])  # (16, 32)
    seen = []
    hook = model.adapter.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    hessians = linear_kernels.calibration_hessians(model, calibration, init_scale=0)
    hook.remove()
    assert set(hessians) == {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert hessians["adapter"].shape == (2 * model.config.n_embd,) * 2
    assert len(seen) == 1 + 2 + 4 and model.config.mean_recurrence == 4  # a call per step of each r
    assert not any(m._forward_pre_hooks for m in model.modules())
    idx = torch.stack([stream[i:i + 32] for i in range(1, 48, 5)])  # other windows
    calibrated = quantize_int8(copy.deepcopy(model), hessians=hessians)
    nearest = quantize_int8(copy.deepcopy(model))
    assert isinstance(calibrated.wte, Int8Embedding)
    with torch.no_grad():
        for r in (2, 4):
            full = model(idx, num_steps=r, init_scale=0)[0]
            errors = [(m(idx, num_steps=r, init_scale=0)[0] - full).norm() for m in (calibrated, nearest)]
            assert errors[0] < 0.8 * errors[1], (r, errors)


def test_calibration_runs_r_bar_itself():
    """r = 1, 2, 4, ... and r_bar: an r_bar of 3 (the release's fine-tunes here) ran at 1 and 2 only."""
    model = tiny_model(mean_recurrence=3)
    calls = []
    hook = model.adapter.register_forward_pre_hook(lambda module, args: calls.append(1))
    linear_kernels.calibration_hessians(model, torch.tensor([PATTERN]), init_scale=0)
    hook.remove()
    assert len(calls) == 1 + 2 + 3


def test_int8_is_close_to_float(trained_model):
    model = copy.deepcopy(trained_model)
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # every Linear, lm_head included
    assert isinstance(model.wte, Int8Embedding)  # the tied embedding's float matrix is gone too
    idx = torch.tensor([PATTERN * 4])
    for r in (1, 4, 8):
        full, _ = trained_model(idx, num_steps=r, init_scale=0)
        low, _ = model(idx, num_steps=r, init_scale=0)
        assert (full.argmax(-1) == low.argmax(-1)).float().mean() > 0.97
        assert (full - low).abs().max() < 0.1 * (full.max() - full.min())


def test_int8_decoding_equals_its_own_full_forward(trained_model):
    """The int8 model decoded through the cache gives what its own full forward pass gives (per-token rounding):
    the same greedy tokens, and logits within 1e-3 (an input that sits on a rounding edge, and differs in its last
    float bits between the two paths, rounds to the other side)."""
    model = quantize_int8(copy.deepcopy(trained_model))
    idx = torch.tensor([PATTERN[:5]])
    out, _ = generate(model, idx, 24, num_steps=6, temperature=0, init_scale=0)
    recomputed = idx
    with torch.no_grad():
        for _ in range(24):
            logits, _ = model(recomputed, num_steps=6, init_scale=0)
            recomputed = torch.cat([recomputed, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, recomputed)
    noise = torch.zeros(1, 64, model.config.n_embd)
    cache = KVCache(model, 1, 64, 6)
    full, _ = model(out, num_steps=6, init_scale=0)
    with torch.no_grad():
        logits, _, _ = forward_cached(model, out[:, :10], cache, 6, noise)
        torch.testing.assert_close(logits, full[:, :10], atol=1e-3, rtol=0)
        for t in range(10, out.size(1)):
            logits, _, _ = forward_cached(model, out[:, t:t + 1], cache, 6, noise)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-3, rtol=0)


def test_int8_decodes_in_bfloat16(trained_model):
    """int8 in a bfloat16 model (the release as the authors run it) and under bfloat16 autocast (sample.py --dtype):
    the activations and the cache keep that dtype, and decoding gives the model's own greedy tokens."""
    idx = torch.tensor([PATTERN[:5]])
    for bf16_weights in (True, False):
        model = copy.deepcopy(trained_model).to(torch.bfloat16 if bf16_weights else torch.float32)
        quantize_int8(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not bf16_weights), torch.no_grad():
            assert model.embed(idx, model.rope[:5]).dtype == (torch.bfloat16 if bf16_weights else torch.float32)
            out, _ = generate(model, idx, 8, num_steps=6, temperature=0, init_scale=0)
            logits, _ = model(out[:, :-1], num_steps=6, init_scale=0)
        assert torch.equal(out[0, 5:], logits[0, 4:].argmax(-1))


def test_generate_quantizes_in_place(trained_model):
    model = copy.deepcopy(trained_model)
    out, _ = generate(model, torch.tensor([PATTERN[:5]]), 12, num_steps=8, temperature=0, quantize="int8")
    assert isinstance(model.lm_head, Int8Linear)
    assert out[0, 5:].tolist() == (PATTERN * 2)[5:17]  # the int8 model still continues the pattern
    with pytest.raises(ValueError, match="quantize"):
        generate(model, torch.tensor([PATTERN[:5]]), 1, quantize="int4")
    with pytest.raises(ValueError, match="max_new_tokens >= 0"):  # it failed deep inside (or returned the prompt)
        generate(model, torch.tensor([PATTERN[:5]]), -1)


def test_a_model_compiled_for_decoding_is_not_quantized_after():
    """generate(quantize="int8") on a model an earlier generate(compile=True) prepared: refused. Its packed weights
    (a model too big to freeze) were silently left float; frozen ones were quantized under the compiled step, which
    then failed with a traceback."""
    model = tiny_model()
    compile_for_decoding(model, freeze=False)  # packed for oneDNN, as the released size is
    with pytest.raises(ValueError, match="nor after it"):
        generate(model, torch.tensor([PATTERN[:5]]), 2, quantize="int8")
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_int8_off_the_cpu_keeps_the_int8_weights():
    """Off the CPU (CUDA; here the meta device, which takes the same path: CI has no GPU) a quantized model keeps
    each Linear's int8 weights as a buffer, expanded per call."""
    with torch.device("meta"):
        model = tiny_model()
    quantize_int8(model)
    assert {m.int8.dtype for m in model.modules() if isinstance(m, Int8Linear)} == {torch.int8}
    # one layer: the whole model cannot run on meta (its norms' autocast needs a real device)
    y = model.core[0].mlp.fc(torch.zeros(1, 5, model.config.n_embd, device="meta"))
    assert y.shape == (1, 5, 2 * model.config.intermediate_size)


def test_packed_decoding_holds_one_copy_of_the_weights(monkeypatch):
    """A model too large to freeze twice (here: a machine said to have no memory to spare) is compiled for decoding
    by packing its Linear weights in place: the same tokens as eager, and every plain weight freed (only the
    embedding, tied to lm_head, keeps its float matrix for lookups)."""
    model = tiny_model()
    idx = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    eager, _ = generate(model, idx, 16, num_steps=4, temperature=0, init_scale=0)
    weights = {name: weakref.ref(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    monkeypatch.setattr(linear_kernels, "memory_bytes", lambda: 0)
    packed, _ = generate(model, idx, 16, num_steps=4, temperature=0, init_scale=0, compile=True)
    assert torch.equal(eager, packed)
    assert all(isinstance(m, PackedLinear) for m in (model.lm_head, model.adapter, model.core[0].mlp.fc))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    alive = [name for name, ref in weights.items() if ref() is not None]
    assert alive == ["lm_head"]  # its weight is wte's, still the embedding
    # under bfloat16 autocast (sample.py --dtype=bfloat16): a packed layer gives bfloat16, as a float Linear does,
    # for the cache (it gave float32, and the first cache write failed)
    plain = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(3, plain.config.n_embd)
        assert torch.allclose(model.adapter(torch.cat([x, x], -1)).float(), plain.adapter(torch.cat([x, x], -1)).float(),
                              rtol=0.02, atol=0.02)
        assert model.adapter(torch.cat([x, x], -1)).dtype == torch.bfloat16
        assert generate(model, idx, 4, num_steps=4, temperature=0, init_scale=0)[0].shape == (1, 12)


def test_small_models_are_frozen_by_inductor(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(linear_kernels, "memory_bytes", lambda: 10**15)
    compile_for_decoding(model, freeze=None)
    assert isinstance(model.lm_head, nn.Linear) and model.compiled_lengths == {1}
