"""
The forms of the model fast batch-1 decoding kernels want: compiled one-token steps (compile_for_decoding), float32
weights packed for oneDNN, and int8 weights. Each replaces a model's nn.Linear layers in place, layer by layer, so
the float weights of a layer are freed as soon as its new form exists: the model never holds two copies (but one:
packing a tied lm_head leaves the embedding its float matrix for lookups, 1.4 GB at the released size in float32).

Batch-1 decoding reads every weight once per step of the core, so at the released size its speed is bytes read per
second (docs/released.md):
- pack_linears: oneDNN's blocked layout streams a wide float32 weight faster than the plain one (1.5-1.9x for the
  released model's matrices on a 2-core CPU). compile_for_decoding uses it where inductor's weight
  freezing would keep a second copy of a large model.
- quantize_int8: int8 weights are a quarter of float32's bytes. Each output channel (a row of the weight) gets its
  own scale, max |w| / 127. Each weight is rounded to the nearest step or, given calibration (calibration_hessians),
  chosen by GPTQ so that the layer's outputs on real inputs stay closest to float32's. On a CPU the fast int8 kernel
  is fbgemm's dynamic linear, which rounds the input to 7 bits too; each token is rounded on a grid of its own, in
  two pieces (see Int8Linear), so a token gives the same result alone (decoding) as in a batch (a full forward
  pass), and the input keeps ~14 bits. Elsewhere (CUDA) the int8 weights are expanded per call.
"""

import os
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F


class PackedLinear(nn.Module):
    """A float Linear (no bias) whose weight is held only in oneDNN's packed layout (CPU)."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # for batch 1 and up

    def forward(self, x):  # in the weight's dtype; out in a float Linear's (autocast's, where it is on)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")
        return y.to(output_dtype(x))


def output_dtype(x):
    """The dtype a float Linear gives for input x: autocast's where it is on (the cache holds that), else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def int8_scales(weight):
    """Per-output-channel symmetric int8's step of each row of weight (out, in): max |w| / 127, (out,)."""
    return weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127


def int8_rows(weight):
    """weight (out, in) rounded to nearest: int8 (out, in), and the scale (out,) of each row."""
    weight = weight.detach().float()  # once: int8_scales takes it as it is
    scale = int8_scales(weight)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def gptq_rows(weight, hessian, block=128):
    """int8_rows chosen by GPTQ (Frantar et al. 2023, Algorithm 1): the columns (inputs) are rounded one at a time,
    and what rounding column c loses is made up by moving the columns not yet rounded, in the proportions that keep
    the layer's outputs X W^T closest on the calibration inputs X. hessian: X^T X (in, in). The scales are
    int8_rows' own; only which of the 255 steps each weight takes changes, so the kernels are the same."""
    w = weight.detach().float().clone()  # (out, in): updated as columns are rounded
    scale = int8_scales(w)  # (out,)
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # an input never seen (nonzero): its column is rounded to nearest
    h[dead, dead] = 1
    h.diagonal().add_(0.01 * h.diagonal().mean())  # damping, so that the inverse exists and stays tame
    # the inputs of largest energy first ("act order"): their columns are rounded while the most columns remain to
    # make up for them
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order], h[order][:, order]
    # the upper Cholesky factor of H^-1: row c holds how column c's rounding error spreads over the columns after it
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    int8 = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for i in range(0, w.shape[1], block):  # a block of columns at a time; the columns after it get one matmul
        j = min(i + block, w.shape[1])
        err = w.new_empty(w.shape[0], j - i)  # (out, block): each column's rounding error, scaled by 1 / u[c, c]
        for c in range(i, j):
            q = torch.round(w[:, c] / scale).clamp(-127, 127)
            int8[:, c] = q.to(torch.int8)
            err[:, c - i] = (w[:, c] - q * scale) / u[c, c]
            w[:, c + 1:j] -= err[:, c - i, None] * u[c, c + 1:j]
        w[:, j:] -= err @ u[i:j, j:]
    return int8[:, torch.argsort(order)], scale  # the columns back in the layer's order


@torch.no_grad()
def calibration_hessians(model, tokens, init_scale=1.0, generator=None):
    """GPTQ's calibration: X^T X (in, in) of the inputs each nn.Linear of model sees on tokens (B, T), by name. The
    model runs at r = 1, 2, 4, ... up to its r_bar: r is chosen at test time, and the core's inputs in its first
    steps (the state near its noise start) are not those of a settled state (fit to r_bar's alone, the int8 model
    agreed with float32 less often at r = 1 than when rounded to nearest)."""
    hessians = {}

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        hessians[name] = hessians.get(name, 0) + x.T @ x

    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: add(name, args[0]))
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:  # the hooks go whatever happens: a model left with them would add to these sums forever
        r_bar = int(model.config.mean_recurrence)
        for num_steps in sorted({2**i for i in range(r_bar.bit_length())} | {r_bar}):
            for batch in tokens.split(16):
                model(batch, num_steps=num_steps, init_scale=init_scale, generator=generator)
    finally:
        for hook in hooks:
            hook.remove()
    return hessians


GRID = 2 / 127  # the step of fbgemm's 7-bit input grid on [-1, 1]: zero point 64, so -1 and 1 are -64 and 64 steps


def on_grid(unit):
    """unit (entries in [-1, 1]) rounded to that grid by the routine fbgemm's dynamic linear rounds with. An entry
    exactly halfway between two steps (an int8 embedding's are: k / 127 is k / 2 steps) goes the way that routine's
    float arithmetic sends it, which torch.round's did not always match; the second piece then missed by a step."""
    with warnings.catch_warnings():  # see Int8Linear.__init__
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(unit, GRID, 64, torch.quint8).dequantize()


class Int8Linear(nn.Module):

    def __init__(self, linear, rows=None):
        """rows: the (int8, scale) to hold (gptq_rows'); None: linear's weights rounded to nearest (int8_rows)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        int8, scale = rows or int8_rows(linear.weight)
        self.register_buffer("scale", scale)  # (out,)
        self.packed = None
        self.register_buffer("int8", None if int8.device.type == "cpu" else int8)  # (out, in) where not packed
        if int8.device.type == "cpu":  # fbgemm's packed copy of the int8 weights is the only one kept
            with warnings.catch_warnings():  # torch 2.13 marks quantized tensors for removal; see docs/decoding.md
                warnings.simplefilter("ignore", UserWarning)
                quantized = torch._make_per_channel_quantized_tensor(int8, scale.double(),
                                                                     torch.zeros(len(scale), dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
            # one row with the values 1 and -1, appended to every input (see forward)
            self.register_buffer("pin", F.pad(torch.tensor([[1.0, -1.0]]), (0, self.in_features - 2)), False)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (N, in): a row per token
        if self.packed is None:  # the int8 weights expanded for this call only, in x's dtype
            y = F.linear(rows, self.int8.to(x.dtype) * self.scale.to(x.dtype)[:, None])
            return y.view(*x.shape[:-1], self.out_features)
        # fbgemm rounds its whole input with one scale, from the input's min and max, to 7 bits (what its AVX2
        # kernels need). So: scale every row to max |x| = 1 and append the row [1, -1, 0, ...], which fixes the
        # input's range at [-1, 1] and with it one grid for every row, whatever else is in the batch. And send each
        # row twice: itself, and what rounding it on that grid leaves, scaled up to max 1 as well. The weights are
        # read once for both, and the two results add up to the product with a ~14-bit input
        rows = rows.float()
        row_max = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (N, 1)
        unit = rows / row_max
        rest = unit - on_grid(unit)  # what fbgemm's rounding leaves of each entry
        rest_max = rest.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(torch.cat([unit, rest / rest_max, self.pin]), self.packed,
                                               reduce_range=True)  # (2N + 1, out)
        n = len(rows)
        return ((y[:n] + y[n:2 * n] * rest_max) * row_max).to(output_dtype(x)).view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """A token embedding with int8 rows: row idx times its scale, each entry rounded to nearest (a lookup's error is
    its own entries': the tied lm_head's GPTQ rows, fit to its products, would be further from them)."""

    def __init__(self, embedding):
        super().__init__()
        int8, scale = int8_rows(embedding.weight)
        self.register_buffer("int8", int8)  # (vocab, h)
        self.register_buffer("scale", scale)  # (vocab,)
        self.dtype = embedding.weight.dtype  # what the model computes in (a bfloat16 model stays bfloat16)

    def forward(self, idx):
        return (self.int8[idx].float() * self.scale[idx, None]).to(self.dtype)


def replace_linears(model, form, names=None):
    """Every nn.Linear of model (or those whose names are given) -> form(name, linear), in place, one at a time:
    only names are kept between layers, so each layer's float weight is freed once its new form exists."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and (names is None or name in names)]
    for name in names:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, form(name, model.get_submodule(name)))
    return model


def pack_linears(model):
    return replace_linears(model, lambda name, linear: PackedLinear(linear))


def quantize_int8(model, names=None, hessians=None):
    """int8 weights for every Linear (the lm_head too); a tied embedding then gets int8 rows as well, so the float
    matrix is freed. `names`: only these Linear layers (a loader quantizes each as it is read). `hessians`:
    calibration_hessians(model, ...): the layers it saw get GPTQ's weights, any other rounds to nearest."""
    hessians = hessians or {}
    replace_linears(model, lambda name, linear: Int8Linear(
        linear, gptq_rows(linear.weight, hessians[name]) if name in hessians else None), names)
    if isinstance(model.lm_head, Int8Linear) and model.config.tie_embeddings and isinstance(model.wte, nn.Embedding):
        model.wte = Int8Embedding(model.wte)
    return model


def compile_for_decoding(model, backend="inductor", freeze=None):
    """Prepare model for fast decoding, once, in place: torch.compile embed, core_step and predict for the lengths
    that recur, one new token (T = 1) and a speculative check (T = lookahead + 1, added by generate). The cache's
    buffers keep their shapes, so one compilation serves every r, position and exit point; prompts have a new
    length each time and run eagerly. The compiled functions shadow the methods on this instance.

    On CUDA: CUDA graphs are asked for, one per step (not yet run on a GPU: inductor declines a graph for a
    function that writes its inputs in place, as the cache writes do; bench.py counts the graphs it declined). On
    a CPU: inductor freezes the weights into the graphs as constants it repacks for batch 1 (1.4-2.7x faster on small
    models across runs; compile a model once it is trained). Frozen constants are a second copy of the weights, so
    freeze=None freezes only a model whose weights fit three times in the machine's memory. A larger one (the
    released 3.5B) has its Linear weights packed in place for oneDNN instead, one copy and no compiling (inductor
    cannot compile around packed weights): linear_kernels.pack_linears."""
    if hasattr(model, "compiled_lengths"):
        return
    model.compiled_lengths = {1}
    cuda = model.rope.device.type == "cuda"
    model.freeze_weights = backend == "inductor" and not cuda  # see decoding_context
    if not cuda:
        if not (3 * weight_bytes(model) < memory_bytes() if freeze is None else freeze):
            pack_linears(model)
            return
    options = None
    if backend == "inductor":  # CUDA graphs: one launch per step instead of one per kernel. CPU: the best kernels
        # for batch 1, which need the weights frozen in (inductor freezes only what runs without grad: generate)
        options = {"triton.cudagraphs": True} if cuda else {"max_autotune": True}
        # and without a table of every candidate kernel's timing on stderr (older torch has no such settings)
        quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        options.update({k: v for k, v in quiet.items() if hasattr(torch._inductor.config, k)})
    for name in ("embed", "core_step", "predict"):
        eager = getattr(model, name)
        compiled = torch.compile(eager, backend=backend, fullgraph=True, options=options)
        setattr(model, name, lambda x, *args, eager=eager, compiled=compiled:
                (compiled if x.size(1) in model.compiled_lengths else eager)(x, *args))


def decoding_context(model):
    """What generate runs in: on a CPU, inductor freezes the weights into the graphs it compiles, which it decides
    when it compiles (the first calls), from its global config: a compile's own options come too late for it. Set
    here around a whole generate call (around each compiled call it cost 10% of a small model's speed)."""
    return torch._inductor.config.patch(freezing=True) if getattr(model, "freeze_weights", False) else nullcontext()


def weight_bytes(model):
    """The bytes of model's parameters (a tied matrix once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_bytes():
    """This machine's memory (POSIX; elsewhere nothing is known, and a model is taken to fit)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return float("inf")
