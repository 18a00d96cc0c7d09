"""
A recurrent-depth language model, written to be read top to bottom: Geiping et al. 2025, "Scaling up Test-Time
Compute with Latent Reasoning: A Recurrent Depth Approach" (the Huginn-0125 model).

One block of layers, the core, is looped r times in latent space; r is chosen per call, so more test-time
compute means more steps of the core (the paper's section 3):

    e   = P(x)                            prelude: embedding, then a few blocks           RecurrentGPT.embed
    s_0 ~ TruncNormal(0, 2/5 I)           noise start of the latent state                 RecurrentGPT.initial_state
    s_i = R(e, s_{i-1}),  i = 1 .. r      core: adapter([s_{i-1}, e]), then blocks         RecurrentGPT.core_step
    p   = C(s_r)                          coda: ln_f, blocks, ln_f, lm_head               RecurrentGPT.predict

Training draws r once per iteration (sample_num_steps; the same r for all its micro-steps) and back-propagates
through the last k steps only. Names, layouts, norms and init follow the released Huginn-0125, so its weights load
into this file (checkpoints.py) and give its logits. Decoding with a KV cache lives in decode.py; this file is the
model.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class RecurrentConfig:
    vocab_size: int = 65536
    block_size: int = 4096          # longest context (length of the RoPE table)
    n_embd: int = 5280              # h: the width of the state and of every block
    n_head: int = 55
    n_layers_prelude: int = 2       # P: blocks run once, before the loop
    n_layers_core: int = 4          # R: blocks run at every step of the loop
    n_layers_coda: int = 2          # C: blocks run once, after it
    intermediate_size: int = 17920  # SwiGLU hidden width
    mean_recurrence: int = 32       # r_bar: training r averages r_bar + 1; the default r at test time
    backprop_depth: int = 8         # k: gradients flow through the last k steps only
    sigma: float = 0.5              # spread of the lognormal in the r sampler
    rope_base: float = 50_000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True            # a learned per-head bias on queries and keys (Huginn)
    tie_embeddings: bool = True

    def __post_init__(self):  # a wrong shape fails here, with its reason, rather than deep inside a layer
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layers_core", "intermediate_size",
                     "mean_recurrence", "backprop_depth"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("n_layers_prelude", "n_layers_coda"):  # these two may be 0
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be n_head ({self.n_head}) times an even head size "
                             "(RoPE rotates pairs)")
        if not (0 <= self.sigma < math.inf and 0 < self.rope_base < math.inf and 0 < self.norm_eps < math.inf):
            raise ValueError("sigma must be >= 0, rope_base and norm_eps > 0, all finite")


# A tiny model for tests, a ~96M model for one GPU, and the released 3.5B model (the defaults above).
PRESETS = {
    "tiny": dict(vocab_size=96, block_size=64, n_embd=64, n_head=4, n_layers_prelude=1, n_layers_core=1,
                 n_layers_coda=1, intermediate_size=128, mean_recurrence=4, backprop_depth=2),
    "small": dict(vocab_size=50304, block_size=1024, n_embd=768, n_head=12, n_layers_prelude=2, n_layers_core=4,
                  n_layers_coda=2, intermediate_size=2048, mean_recurrence=8, backprop_depth=4),
    "huginn-0125": dict(),
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return RecurrentConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32 even under bf16 autocast, as the reference does
        with torch.autocast(x.device.type, enabled=False):
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def precompute_rope(head_dim, length, base):
    """cos and sin of position * frequency, (length, head_dim/2, 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """Rotate the pairs (x[2i], x[2i+1]) of x (B, T, nh, hd) by rope (T, hd/2, 2), or (B, T, hd/2, 2) when each row
    has positions of its own (decoding prompts of different lengths), in float32."""
    # Huginn pairs neighbours (the original LLaMA / GPT-J layout), not the two halves as HF LLaMA does
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, nh, hd/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    rope = rope if rope.dim() == 4 else rope[None]  # (B or 1, T, hd/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (B or 1, T, 1, hd/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class Linear(nn.Linear):
    """A Linear layer without bias. On a CPU, a product with 2 to out_features // 4 rows (a prompt, a batch of tokens
    being decoded) is taken as (W x^T)^T: the same product (summed in another order: ~1e-6 apart), but the BLAS
    streams a wide weight far better as the left operand (16 rows by the core's MLP matrix of Huginn-0125: 342 ms
    as x W^T, 194 ms as (W x^T)^T, 1.8x; docs/released.md). One row, more rows (training), other devices and
    compiled graphs (where inductor packs the weight of F.linear for its own kernels) take the usual path."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or not 1 < rows <= self.out_features // 4 or torch.compiler.is_compiling():
            return F.linear(x, self.weight)
        return (self.weight @ x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], self.out_features)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # one fused projection for queries, keys and values, rows Q | K | V
        self.Wqkv = Linear(config.n_embd, 3 * config.n_embd)
        # per-head biases on q (row 0) and k (row 1), added before RoPE
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim)) if config.qk_bias else None
        self.proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, rope, kv=None):
        B, T, C = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, nh, hd) each
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        # RoPE in float32, then v's dtype: under autocast the cached keys and values share one dtype
        q, k = apply_rope(q, rope).type_as(v), apply_rope(k, rope).type_as(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if kv is None:  # training: the whole sequence at once
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # decoding (decode.py): write the new keys and values into fixed-size buffers (B, nh, max_len, hd) at
            # `index` (T,), then attend to what the cache's mask (B, 1, T, max_len) allows: the earlier tokens
            k_cache, v_cache, index, mask = kv
            k_cache.index_copy_(2, index, k)
            v_cache.index_copy_(2, index, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class GatedMLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        # SwiGLU with one fused input projection: the gate is the first half of `fc`, the value the second
        self.fc = Linear(config.n_embd, 2 * config.intermediate_size)
        self.proj = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        gate, value = self.fc(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.proj(F.silu(gate) * value)


class SandwichBlock(nn.Module):
    """Huginn's block: each branch is pre-normed, and the residual sum is normed again (paper section 3).
    Norming the stream after every add keeps the state on one scale however often the core is looped."""

    def __init__(self, config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, rope, kv=None):
        x = self.norm_2(x + self.attn(self.norm_1(x), rope, kv))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


# -----------------------------------------------------------------------------------------------------------
# The r sampler (paper section 3; the reference's "poisson-lognormal-filling")


def sample_num_steps(mean_recurrence, sigma=0.5, generator=None):
    """One training r: tau ~ N(log r_bar - sigma^2/2, sigma), r = Poisson(exp(tau)) + 1."""
    # E[exp(tau)] = r_bar, so r averages r_bar + 1; the median is lower and the tail heavy: the model sees both
    # shallow and very deep loops
    mu = math.log(mean_recurrence) - sigma**2 / 2
    tau = torch.normal(mu, sigma, size=(1,), generator=generator, device=generator.device if generator else None)
    return int(torch.poisson(tau.exp(), generator=generator).item()) + 1


# -----------------------------------------------------------------------------------------------------------
# The model


class RecurrentGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        h = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, h)
        self.prelude = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_prelude))
        # input injection: every step sees e again, through the adapter on [state, e] (2h -> h)
        self.adapter = Linear(2 * h, h)
        self.core = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_core))
        self.coda = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_coda))
        self.ln_f = RMSNorm(h, config.norm_eps)  # one module, used twice: before and after the coda
        self.lm_head = Linear(h, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        rope = precompute_rope(h // config.n_head, config.block_size, config.rope_base)  # (block_size, hd/2, 2)
        self.register_buffer("rope", rope, persistent=False)
        self.checkpoint_steps = False  # activation checkpointing per step of the core (train.py sets it)
        self.init_weights()

    def init_weights(self):
        # Huginn's "takase" init (Spike No More): matrices ~ N(0, 2/(5h)) cut at 3 std; the output projections
        # shrunk by sqrt(2 * effective depth), where the core counts r_bar times; norms 1, qk_bias 0
        cfg = self.config
        std = math.sqrt(2 / (5 * cfg.n_embd))
        effective_depth = cfg.n_layers_prelude + cfg.n_layers_coda + cfg.n_layers_core * cfg.mean_recurrence
        out_std = std / math.sqrt(2 * effective_depth)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.trunc_normal_(p, std=out_std, a=-3 * out_std, b=3 * out_std)
            elif name.endswith("qk_bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # wte (= lm_head when tied), Wqkv, fc, adapter
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
            else:  # RMSNorm weights
                nn.init.ones_(p)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    # --- the four equations, one method each. `kv` is for decoding only (decode.py); training passes None ---

    def embed(self, idx, rope, kv=None):
        # e = P(x): the embedding times sqrt(h) (a fixed scale, as released), then the prelude blocks
        x = self.wte(idx) * math.sqrt(self.config.n_embd)  # (B, T, h)
        for i, block in enumerate(self.prelude):
            x = block(x, rope, kv[i] if kv else None)
        return x

    def initial_state(self, shape, init_scale=1.0, generator=None, dtype=None):
        # s_0 of shape (B, T, h): fresh noise for every position, std sqrt(2/(5h)) cut at 3 std, times sqrt(h) like
        # the embedding, so std sqrt(2/5) * init_scale (0: the zero state). Training from noise teaches the core to
        # reach the same answer from any start (path independence). On the model's device, in dtype (default: its own)
        if not 0 <= init_scale < math.inf:  # a negative or nan one would be the zero state, silently
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale}")
        std = math.sqrt(2 / (5 * self.config.n_embd)) * init_scale
        state = torch.zeros(shape, dtype=dtype or self.ln_f.weight.dtype, device=self.rope.device)
        if std > 0:
            nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std, generator=generator)
        return state * math.sqrt(self.config.n_embd)

    def core_step(self, state, e, rope, kv=None):
        # s_i = R(e, s_{i-1}): the adapter mixes [state, e], then the core blocks; the last block's norm_4 is the
        # only norm between steps
        x = self.adapter(torch.cat([state, e], dim=-1))  # (B, T, 2h) -> (B, T, h)
        for i, block in enumerate(self.core):
            x = block(x, rope, kv[i] if kv else None)
        return x

    def predict(self, state, rope, kv=None, last=False):
        # p = C(s_r): ln_f, the coda blocks, ln_f again (the same module), lm_head; logits in float32. last=True:
        # the logits of the last position only (a prompt in decoding needs no others; (B, 1, vocab))
        x = self.ln_f(state)
        for i, block in enumerate(self.coda):
            x = block(x, rope, kv[i] if kv else None)
        return self.lm_head(self.ln_f(x[:, -1:] if last else x)).float()  # (B, T, vocab)

    def iterate(self, state, e, rope, num_steps, cache=None):
        # The loop, yielding s_1 ... s_r: training, evaluation, decoding (with a cache) and latents.py all use it.
        # Truncated backprop: the first r - k steps build no graph, so memory depends on k, not on r, and the
        # prelude learns through e in the last k steps only
        n_grad = min(num_steps, self.config.backprop_depth) if torch.is_grad_enabled() else 0
        for step in range(num_steps):
            with torch.set_grad_enabled(step >= num_steps - n_grad):
                # --activation_checkpointing (train.py): keep only the step's input, recompute the step in backward
                if self.checkpoint_steps and torch.is_grad_enabled():
                    state = checkpoint(self.core_step, state, e, rope, use_reentrant=False)
                else:
                    state = self.core_step(state, e, rope, cache.core(step) if cache else None)
            yield state

    def forward(self, idx, targets=None, num_steps=None, init_scale=1.0, state=None, generator=None):
        # Logits (B, T, vocab) and, given targets, the mean next-token loss (targets -1 are ignored).
        # num_steps is r: None draws it in training mode and takes r_bar in eval mode. `state` replaces the noise
        # start s_0. `generator` (a torch.Generator) draws r (when num_steps is None) and the noise start. train.py
        # draws r itself, once per iteration (shared by its micro-steps and ranks), and passes a generator keyed by
        # (iteration, micro-step), for exact resume; forward's own draw of r serves tests and outside callers
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if num_steps is None:
            cfg = self.config
            num_steps = sample_num_steps(cfg.mean_recurrence, cfg.sigma, generator) if self.training \
                else cfg.mean_recurrence
        if num_steps != int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps (r) must be a whole number >= 1, got {num_steps}")
        rope = self.rope[:T]
        e = self.embed(idx, rope)  # (B, T, h)
        if state is None:
            state = self.initial_state(e.shape, init_scale, generator, dtype=e.dtype)
        for state in self.iterate(state, e, rope, num_steps):
            pass
        logits = self.predict(state, rope)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- training helpers ---

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # AdamW; matrices (the embedding too, as in the reference) decay, norm weights and qk_bias do not
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:  # a frozen weight (LoRA's base) has nothing to update
                (no_decay if p.dim() < 2 or name.endswith("qk_bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def compile_pieces(self, **compile_kwargs):
        # torch.compile embed, core_step and predict, whose shapes never depend on r; the loop stays in Python,
        # so a new r calls the same compiled core_step more or fewer times and never recompiles. The compiled
        # functions shadow the methods on this instance; the state_dict keeps its plain names
        for name in ("embed", "core_step", "predict"):
            setattr(self, name, torch.compile(getattr(self, name), **compile_kwargs))
        return self

    def estimate_flops_per_token(self, num_steps=None, seq_len=None, training=True, frozen=False, prelude_trains=True):
        # 2 FLOPs per weight per token in every matmul, plus attention (QK^T and AV, 4*T*h per layer, unmasked
        # as in PaLM appendix B). The core and adapter run r times forward; backward runs over the graph: the
        # coda once, the core min(r, k) times, the prelude once where something in it trains (LoRA on the core and
        # adapter only: nothing before e needs a gradient). A backward product is 2x its forward (the input's
        # gradient and the weight's); frozen=True (LoRA: the weights do not train) leaves the weight's out, so 1x,
        # except in attention, which has no weights (the adapters' rank-sized products are left out)
        cfg = self.config
        r = cfg.mean_recurrence if num_steps is None else num_steps
        T, h = cfg.block_size if seq_len is None else seq_len, cfg.n_embd
        # per block: Wqkv + proj and fc + proj (weights); QK^T and AV (attention)
        weights, attention = 2 * (4 * h * h + 3 * h * cfg.intermediate_size), 4 * T * h
        prelude, coda = cfg.n_layers_prelude * (weights + attention), cfg.n_layers_coda * (weights + attention)
        coda += 2 * h * cfg.vocab_size  # and the lm_head
        step = cfg.n_layers_core * (weights + attention) + 2 * (2 * h * h)  # core blocks + adapter
        forward = prelude + coda + r * step
        if not training:
            return forward
        layers = cfg.n_layers_coda + min(r, cfg.backprop_depth) * cfg.n_layers_core  # what the backward runs over
        graph = coda + min(r, cfg.backprop_depth) * step
        if prelude_trains:
            graph, layers = graph + prelude, layers + cfg.n_layers_prelude
        else:  # nor the first step's adapter: neither of its inputs (s, from a step without graph; e) needs one
            graph -= 2 * (2 * h * h)
        return forward + (graph + layers * attention if frozen else 2 * graph)
