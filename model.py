"""
A recurrent-depth language model, written to be read top to bottom.

Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach"
(the Huginn-0125 model). Instead of stacking more layers, one block of layers (the core) is looped r times
in latent space; r is chosen per forward pass, so more test-time compute means more iterations:

    e   = P(x)                       prelude: embedding + a few blocks          -> RecurrentGPT.embed
    s_0 ~ N(0, sigma^2 I) truncated  noise-initialised latent state             -> RecurrentGPT.initial_state
    s_i = R(e, s_{i-1}), i = 1..r    core: adapter([s, e]) -> blocks             -> RecurrentGPT.core_step
    p   = C(s_r)                     coda: ln_f -> blocks -> ln_f -> lm_head     -> RecurrentGPT.predict

Every detail (names, fused projections, RoPE layout, norms, init) follows the released Huginn-0125, so
its weights can be loaded into this file and give its logits.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RecurrentConfig:
    vocab_size: int = 65536
    block_size: int = 4096          # longest context (RoPE table length)
    n_embd: int = 5280              # h, the width of the state and every block
    n_head: int = 55
    n_layers_prelude: int = 2       # P: blocks run once before the recurrence
    n_layers_core: int = 4          # R: blocks inside one iteration of the recurrence
    n_layers_coda: int = 2          # C: blocks run once after it
    intermediate_size: int = 17920  # SwiGLU hidden width
    mean_recurrence: int = 32       # r_bar: mean training depth and default test depth
    backprop_depth: int = 8         # k: gradients flow through only the last k iterations
    sigma: float = 0.5              # spread of the lognormal in the depth sampler
    rope_base: float = 50_000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True            # learned per-head bias on queries and keys (Huginn)
    tie_embeddings: bool = True


# Presets: a tiny model for tests, a ~96M model for one GPU, and the released 3.5B shapes.
PRESETS = {
    "tiny": dict(vocab_size=96, block_size=64, n_embd=64, n_head=4, n_layers_prelude=1, n_layers_core=1,
                 n_layers_coda=1, intermediate_size=128, mean_recurrence=4, backprop_depth=2),
    "small": dict(vocab_size=50304, block_size=1024, n_embd=768, n_head=12, n_layers_prelude=2, n_layers_core=4,
                  n_layers_coda=2, intermediate_size=2048, mean_recurrence=8, backprop_depth=4),
    "huginn-0125": dict(),  # the dataclass defaults are the released model
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return RecurrentConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 even under bf16 autocast (as the reference does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def precompute_rope(head_dim, length, base):
    """cos and sin of position * frequency, (length, head_dim/2, 2), for rotating consecutive pairs."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (B, T, nh, hd) by rope (T, hd/2, 2), in float32.

    Huginn uses this original-LLaMA / GPT-J layout, not the rotate-half layout of HF LLaMA."""
    x_pairs = x.float().unflatten(-1, (-1, 2))          # (B, T, nh, hd/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]           # (B, T, nh, hd/2) each
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]  # (1, T, 1, hd/2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # one fused projection for queries, keys and values, in that order (rows Q | K | V)
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        # Huginn's per-head bias on q (row 0) and k (row 1), added before RoPE
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_head, self.head_dim)) if config.qk_bias else None
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope, kv_cache=None, layer_id=None):
        B, T, C = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, nh, hd) each
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # decoding: attend to this layer's cached keys/values of the whole context (B, nh, T_ctx, hd)
            k, v = kv_cache.update(layer_id, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, k.size(2), x.device))
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def causal_mask(n_query, n_key, device):
    """Boolean mask for the last n_query positions of n_key: query i sees keys up to n_key - n_query + i."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


class GatedMLP(nn.Module):
    """SwiGLU with one fused input projection: the first half of `fc` is the gate, the second half the value."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        gate, value = self.fc(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.proj(F.silu(gate) * value)


class SandwichBlock(nn.Module):
    """Huginn's block: each branch is pre-normed, and the residual sum itself is normed again.

        x = norm_2(x + attn(norm_1(x)))
        x = norm_4(x + mlp(norm_3(x)))

    Norming the stream after every add keeps the state on a fixed scale however many times the core is
    looped; the paper reports that runs without these sandwich norms failed at scale."""

    def __init__(self, config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, rope, kv_cache=None, layer_id=None):
        x = self.norm_2(x + self.attn(self.norm_1(x), rope, kv_cache, layer_id))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


# -----------------------------------------------------------------------------------------------------------
# Depth sampler (paper section 3.3, reference: "poisson-lognormal-filling")


def sample_num_steps(mean_recurrence, backprop_depth, sigma=0.5, generator=None):
    """Draw one training depth r and split it into (n_no_grad, n_grad) iterations.

    tau ~ N(log(r_bar) - sigma^2/2, sigma), so E[exp(tau)] = r_bar;  r = Poisson(exp(tau)) + 1 >= 1.
    The mean of r is r_bar + 1, the median is lower and the tail is heavy: the model sees both shallow and
    very deep recurrences. Only the last n_grad = min(r, k) iterations are back-propagated."""
    mu = math.log(mean_recurrence) - sigma**2 / 2
    tau = torch.normal(mu, sigma, size=(1,), generator=generator)
    r = int(torch.poisson(tau.exp(), generator=generator).item()) + 1
    n_grad = min(r, backprop_depth)
    return r - n_grad, n_grad


# -----------------------------------------------------------------------------------------------------------
# The model


class RecurrentGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        h = config.n_embd
        assert h % config.n_head == 0, "n_embd must be divisible by n_head"
        self.wte = nn.Embedding(config.vocab_size, h)
        self.prelude = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_prelude))
        # input injection: every iteration sees the prelude output e again, concatenated as [state, e]
        self.adapter = nn.Linear(2 * h, h, bias=False)
        self.core = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_core))
        self.coda = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_coda))
        self.ln_f = RMSNorm(h, config.norm_eps)  # one module, used twice: before and after the coda
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # RoPE table, recomputed rather than saved (the reference stores it as `freqs_cis`)
        rope = precompute_rope(h // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope", rope, persistent=False)
        self.init_weights()

    def init_weights(self):
        """Huginn's "takase" init (Spike No More): every matrix ~ N(0, 2/(5h)) truncated at 3 std; output
        projections scaled down by sqrt(2 * effective depth), counting the core r_bar times; norms 1, qk_bias 0."""
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
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied matrix once

    # --- the four equations, one method each ---

    def embed(self, idx, rope, kv_cache=None):
        """e = P(x): token embedding times sqrt(h) (a fixed scale, as released), then the prelude blocks."""
        x = self.wte(idx) * math.sqrt(self.config.n_embd)  # (B, T, h)
        for i, block in enumerate(self.prelude):
            x = block(x, rope, kv_cache, ("prelude", i))
        return x

    def initial_state(self, e, init_scale=1.0, generator=None):
        """s_0: fresh truncated-normal noise per call and per position, std sqrt(2/(5h)) cut at 3 std, times
        sqrt(h) (the embedding scale). init_scale scales the std; init_scale=0 gives the zero state.

        Starting from noise trains the core to reach the same answer from any start (path independence)."""
        std = math.sqrt(2 / (5 * self.config.n_embd)) * init_scale
        state = torch.zeros_like(e)  # (B, T, h)
        if std > 0:
            nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std, generator=generator)
        return state * math.sqrt(self.config.n_embd)

    def core_step(self, state, e, rope, kv_cache=None, step=0):
        """s_i = R(e, s_{i-1}): the adapter mixes [state, e] (2h -> h), then the core blocks.

        The core's last norm_4 is the only norm between iterations; `step` only labels the KV cache."""
        x = self.adapter(torch.cat([state, e], dim=-1))  # (B, T, 2h) -> (B, T, h)
        for i, block in enumerate(self.core):
            x = block(x, rope, kv_cache, ("core", step, i))
        return x

    def predict(self, state, rope, kv_cache=None):
        """p = C(s_r): ln_f, the coda blocks, ln_f again (the same module), lm_head. Logits in float32."""
        x = self.ln_f(state)
        for i, block in enumerate(self.coda):
            x = block(x, rope, kv_cache, ("coda", i))
        return self.lm_head(self.ln_f(x)).float()  # (B, T, vocab)

    def split_num_steps(self, num_steps):
        """(n_no_grad, n_grad) for a forward pass; see forward for the rules."""
        if num_steps is None and self.training:
            return sample_num_steps(self.config.mean_recurrence, self.config.backprop_depth, self.config.sigma)
        if num_steps is None:
            num_steps = self.config.mean_recurrence
        if isinstance(num_steps, int):
            if num_steps < 1:
                raise ValueError(f"num_steps must be at least 1, got {num_steps}")
            n_grad = min(num_steps, self.config.backprop_depth)
            return num_steps - n_grad, n_grad
        n_no_grad, n_grad = num_steps  # an explicit pair, e.g. drawn by train.py with one seed on every rank
        return int(n_no_grad), int(n_grad)

    def iterate(self, state, e, rope, n_no_grad, n_grad):
        """Run the recurrence with truncated backprop: the first n_no_grad iterations build no graph,
        so activation memory depends on k, not on r; gradients reach the prelude only through e in the last
        n_grad iterations."""
        with torch.no_grad():
            for _ in range(n_no_grad):
                state = self.core_step(state, e, rope)
        for _ in range(n_grad):
            state = self.core_step(state, e, rope)
        return state

    def forward(self, idx, targets=None, num_steps=None, init_scale=1.0, state=None):
        """Logits (B, T, vocab) for every position, and the mean next-token loss if targets are given.

        num_steps=None samples the depth in training mode and uses r_bar in eval mode; an int r runs r
        iterations (the last min(r, k) with gradients); a pair (n_no_grad, n_grad) is taken as it is.
        `state` replaces the noise start s_0 (e.g. a warm start); init_scale scales the noise."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        rope = self.rope[:T]
        e = self.embed(idx, rope)  # (B, T, h)
        if state is None:
            state = self.initial_state(e, init_scale)
        n_no_grad, n_grad = self.split_num_steps(num_steps)
        state = self.iterate(state, e, rope, n_no_grad, n_grad)
        logits = self.predict(state, rope)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- training helpers ---

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with two groups: matrices (embedding included, as in the reference) decay; norm weights and
        qk_bias do not."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (no_decay if p.dim() < 2 or name.endswith("qk_bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"  # the fused kernel is faster and exists only on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def compile_pieces(self, **compile_kwargs):
        """torch.compile the three pieces whose shapes never depend on r (embed, core_step, predict) and leave the
        depth loop in Python: a new r calls the same compiled core_step more or fewer times and never recompiles.
        The compiled functions shadow the methods on this instance; the state_dict keeps its plain names."""
        for name in ("embed", "core_step", "predict"):
            setattr(self, name, torch.compile(getattr(self, name), **compile_kwargs))
        return self

    def estimate_flops_per_token(self, num_steps=None, seq_len=None, training=True):
        """FLOPs per token of one pass at depth r: 2 per weight per token in every matmul, plus attention
        (QK^T and AV, 4*T*h per layer, counted unmasked as in PaLM appendix B). Prelude, coda and lm_head run
        once; the core and adapter r times forward. Training adds a backward pass (2x forward) over the
        graph: everything but the core once, the core k = min(r, backprop_depth) times."""
        cfg = self.config
        r = cfg.mean_recurrence if num_steps is None else num_steps
        k = min(r, cfg.backprop_depth)
        T, h = cfg.block_size if seq_len is None else seq_len, cfg.n_embd
        block = 2 * (4 * h * h + 3 * h * cfg.intermediate_size) + 4 * T * h  # Wqkv+proj, fc+proj, attention
        once = (cfg.n_layers_prelude + cfg.n_layers_coda) * block + 2 * h * cfg.vocab_size
        iteration = cfg.n_layers_core * block + 2 * (2 * h * h)  # core blocks + adapter
        forward = once + r * iteration
        return forward + (2 * (once + k * iteration) if training else 0)

    # --- loading the released Huginn-0125 (extras: pip install safetensors huggingface_hub) ---

    # Our config fields -> the keys of the released config.json.
    HF_CONFIG_KEYS = dict(vocab_size="vocab_size", block_size="block_size", n_embd="n_embd", n_head="n_heads",
                          n_layers_prelude="n_layers_in_prelude", n_layers_core="n_layers_in_recurrent_block",
                          n_layers_coda="n_layers_in_coda", intermediate_size="intermediate_size",
                          mean_recurrence="mean_recurrence", backprop_depth="mean_backprop_depth",
                          rope_base="rope_base", norm_eps="norm_eps", qk_bias="qk_bias",
                          tie_embeddings="tie_embeddings")
    # Our modules -> the released weight names. Only the prefixes differ: inside a block the names (norm_1,
    # attn.Wqkv, attn.qk_bias, attn.proj, norm_2, norm_3, mlp.fc, mlp.proj, norm_4) and every tensor layout are
    # the reference's, so loading is renaming; no transposes or permutations.
    HF_NAMES = dict(wte="transformer.wte", prelude="transformer.prelude", adapter="transformer.adapter",
                    core="transformer.core_block", coda="transformer.coda", ln_f="transformer.ln_f",
                    lm_head="lm_head")

    @classmethod
    def hf_name(cls, name):
        """Our parameter name -> the released one: core.3.mlp.fc.weight -> transformer.core_block.3.mlp.fc.weight"""
        module, rest = name.split(".", 1)
        return f"{cls.HF_NAMES[module]}.{rest}"

    @staticmethod
    def pretrained_folder(name_or_path):
        """A local folder in the released layout; `huginn-0125` is downloaded (once, then cached) from the hub."""
        if os.path.isdir(name_or_path):
            return name_or_path
        if name_or_path not in ("huginn-0125", "tomg-group-umd/huginn-0125"):
            raise FileNotFoundError(f"{name_or_path}: no such folder; give a folder with config.json and "
                                    "*.safetensors, or huginn-0125 to download the released model")
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ImportError("downloading huginn-0125 needs: pip install safetensors huggingface_hub") from None
        # config.json, tokenizer.json, the safetensors shards and their index: ~16 GB (float32)
        return snapshot_download("tomg-group-umd/huginn-0125", allow_patterns=["*.json", "*.safetensors"])

    @classmethod
    def pretrained_config(cls, folder):
        """RecurrentConfig from a released config.json; keys it lacks keep our (= the released) defaults."""
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; a pretrained folder holds config.json and *.safetensors")
        with open(path) as f:
            hf = json.load(f)
        for key, value in dict(bias=False, injection_type="linear", state_init="like-init", test_time_noise=0).items():
            if hf.get(key, value) != value:  # variants of the reference code that this file does not implement
                raise ValueError(f"{path}: {key}={hf[key]!r} is not supported here (Huginn-0125 has {value!r})")
        return RecurrentConfig(**{ours: hf[theirs] for ours, theirs in cls.HF_CONFIG_KEYS.items() if theirs in hf})

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32):
        """Load Huginn-0125 (or any folder in its layout: config.json + one or more *.safetensors) into this model.

        The model is built on the meta device (no memory, no random init); the checkpoint's tensors, renamed and
        shape-checked, then become its parameters. Shards are read one at a time and cast to dtype on device."""
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("loading pretrained weights needs: pip install safetensors huggingface_hub") from None
        folder = cls.pretrained_folder(name_or_path)
        config = cls.pretrained_config(folder)
        with torch.device("meta"):
            model = cls(config)
        index = os.path.join(folder, "model.safetensors.index.json")  # present when the weights are sharded
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        else:
            shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not shards:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
        state = {}
        for shard in shards:
            for name, tensor in load_file(os.path.join(folder, shard), device=str(device)).items():
                state[name] = tensor if name == "freqs_cis" else tensor.to(dtype)
        # The release also stores its RoPE table, freqs_cis (1, T, 1, hd/2, 2): the same numbers as ours (T, hd/2, 2),
        # kept in float32 as the reference does. Comparing them checks block_size and rope_base for free.
        rope = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_base).to(device)
        stored_rope = state.pop("freqs_cis", None)
        if stored_rope is not None and not (stored_rope.numel() == rope.numel()
                                            and torch.allclose(stored_rope.float().view_as(rope), rope, atol=1e-5)):
            raise ValueError(f"{folder}: the stored RoPE table freqs_cis differs from ours (block_size, rope_base?)")
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)  # the release stores a second copy of the tied embedding
        loaded = {}
        for name, expected in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_embeddings:
                continue
            hf_name = cls.hf_name(name)
            if hf_name not in state:
                raise KeyError(f"{folder}: checkpoint has no {hf_name} (our {name})")
            loaded[name] = state.pop(hf_name)
            if loaded[name].shape != expected.shape:
                raise ValueError(f"{folder}: {hf_name} has shape {tuple(loaded[name].shape)}, but config.json "
                                 f"implies {tuple(expected.shape)}")
        if state:
            raise ValueError(f"{folder}: unexpected tensors in the checkpoint, e.g. {next(iter(state))}")
        if config.tie_embeddings:
            loaded["lm_head.weight"] = loaded["wte.weight"]
        model.load_state_dict(loaded, assign=True)  # the loaded tensors become the parameters (no copies)
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight  # assign=True gave lm_head its own Parameter object; share wte's
        model.rope = rope  # the buffer was built on the meta device
        return model.eval()


# -----------------------------------------------------------------------------------------------------------
# Inference: a depth-aware KV cache, early exit, warm start
# (the reference's behaviour is summarised in ../shared/spec/huginn_reference.md, section 5)


class RecurrentKVCache:
    """Keys and values of every attention layer for the tokens seen so far, filled by the attention hook.

    Prelude and coda layers run once per token: one entry each. The core runs r times and iteration i of a
    new token attends to the earlier tokens' keys of the same iteration, so the core gets one entry per
    (iteration, core layer), a "virtual layer" v = step * n_layers_core + layer (the reference's
    HuginnDynamicCache). That grows with r; a cache budget N keeps only N core entries, v mod N, so later
    iterations overwrite earlier ones (the reference's "compress-sN"; N = n_layers_core keeps the last
    iteration only, the memory of a plain transformer of the same width)."""

    def __init__(self, n_layers_core, max_len, cache_budget=None):
        self.n_layers_core = n_layers_core
        self.max_len = max_len            # the longest context an entry holds
        self.cache_budget = cache_budget  # None: one entry per virtual core layer
        self.keys, self.values = {}, {}   # entry name -> (B, nh, max_len, hd), preallocated
        self.length = {}                  # entry name -> how many positions are written
        self.pos = 0                      # position of the first new token; forward_cached advances it

    def entry(self, layer_id):
        """("prelude", i) and ("coda", i) name their own entry; ("core", step, i) -> ("core", v), v mod N."""
        if layer_id[0] != "core":
            return layer_id
        _, step, layer = layer_id
        v = step * self.n_layers_core + layer
        return ("core", v if self.cache_budget is None else v % self.cache_budget)

    def update(self, layer_id, k, v):
        """Write the new tokens' k, v (B, nh, T, hd) at positions pos..pos+T; return the context's (B, nh, pos+T, hd).

        Writing the same positions again overwrites them: the budget relies on it, and so does the kl exit
        check, which runs the coda after every iteration (the final state's run is the one that stays)."""
        name = self.entry(layer_id)
        if name not in self.keys:
            B, nh, _, hd = k.shape
            self.keys[name] = k.new_zeros(B, nh, self.max_len, hd)
            self.values[name] = v.new_zeros(B, nh, self.max_len, hd)
            self.length[name] = 0
        start, end, done = self.pos, self.pos + k.size(2), self.length[name]
        if done < start:
            # Earlier tokens that exited before this iteration have no entry here. They get the entry of the
            # iteration below (same core layer), which this token has just completed; by induction that is
            # their latest entry at or below this iteration (the reference's "latest-m4").
            _, step, layer = layer_id
            below = self.entry(("core", step - 1, layer))
            self.keys[name][:, :, done:start] = self.keys[below][:, :, done:start]
            self.values[name][:, :, done:start] = self.values[below][:, :, done:start]
        self.keys[name][:, :, start:end] = k
        self.values[name][:, :, start:end] = v
        self.length[name] = end
        return self.keys[name][:, :, :end], self.values[name][:, :, :end]

    def num_core_entries(self):
        return sum(name[0] == "core" for name in self.keys)


EXIT_CRITERIA = ("none", "kl", "latent-diff")


def forward_cached(model, idx, cache, num_steps, exit_criterion="none", exit_threshold=0.0, state=None,
                   init_scale=1.0):
    """Run new tokens idx (B, T) at positions cache.pos.. through the model, reading and filling the cache.

    The same embed, core_step and predict as forward, so the logits equal forward's over the whole context.
    With an exit criterion the recurrence stops once the change between iterations is below exit_threshold
    for every row (zero-shot: the model was never trained to exit; the reference checks after each
    iteration and waits for the whole batch). `state` replaces the noise start (warm start).
    Returns the last position's logits (B, vocab), the final state (B, T, h) and the iterations run."""
    T = idx.size(1)
    rope = model.rope[cache.pos:cache.pos + T]
    e = model.embed(idx, rope, cache)  # (B, T, h)
    if state is None:
        state = model.initial_state(e, init_scale)
    log_probs = None
    for step in range(num_steps):
        prev_state, state = state, model.core_step(state, e, rope, cache, step)
        if exit_criterion == "latent-diff":  # ||s_i - s_{i-1}|| / ||s_i||, per position
            change = (state - prev_state).norm(dim=-1) / state.norm(dim=-1)
        elif exit_criterion == "kl":  # KL(p_{i-1} || p_i) of the next-token distributions, p_0 uniform
            prev_log_probs = log_probs
            log_probs = F.log_softmax(model.predict(state, rope, cache), dim=-1)  # (B, T, vocab)
            if prev_log_probs is None:
                prev_log_probs = torch.full_like(log_probs, -math.log(log_probs.size(-1)))
            # KL >= 0; the clamp stops rounding from making it negative, so a threshold of 0 never exits
            change = (prev_log_probs.exp() * (prev_log_probs - log_probs)).sum(-1).clamp(min=0)
        if exit_criterion != "none" and change.max() < exit_threshold:
            break
    logits = model.predict(state, rope, cache)
    cache.pos += T
    return logits[:, -1], state, step + 1


def prefill(model, context, max_len, num_steps, cache_budget, init_scale):
    """A new cache filled with context (B, T) at full depth (the reference never exits in the prefill), and
    the final state of its last position (B, 1, h) for a warm start (None for an empty context)."""
    cache = RecurrentKVCache(model.config.n_layers_core, max_len, cache_budget)
    if context.size(1) == 0:
        return cache, None
    _, state, _ = forward_cached(model, context, cache, num_steps, init_scale=init_scale)
    return cache, state[:, -1:]


def sample_next(logits, temperature=1.0, top_k=None):
    """One token id per row (B, 1) from next-token logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def stopped(idx, stop_ids, n_new):
    """True once each row's n_new newest tokens include one of stop_ids."""
    if not stop_ids:
        return False
    stops = torch.tensor(list(stop_ids), device=idx.device)
    return bool(torch.isin(idx[:, idx.size(1) - n_new:], stops).any(dim=1).all())


@torch.no_grad()
def generate(model, idx, max_new_tokens, num_steps=None, temperature=1.0, top_k=None, exit_criterion="none",
             exit_threshold=0.0, cache_budget=None, warm_start=False, init_scale=1.0, use_cache=True, stop_ids=()):
    """Continue the prompt idx (B, T) by max_new_tokens tokens. Returns (idx (B, T + max_new_tokens), the
    iterations used to predict each new token (a list)).

    Each new token is predicted by one cached forward of the token before it at num_steps iterations
    (default r_bar), fewer if it exits early (exit_criterion "kl" or "latent-diff" below exit_threshold).
    cache_budget=N keeps only N core entries. warm_start begins each token's state at the previous token's
    final core output instead of noise (the reference's continuous_compute; its adaptive path also uses the
    core output, its minimal path the ln_f-normed one). use_cache=False is the slow baseline: the whole
    context is run again for every token, at fixed depth. Decoding stops early once every row has produced
    one of stop_ids (e.g. an end-of-turn token)."""
    cfg = model.config
    num_steps = cfg.mean_recurrence if num_steps is None else num_steps
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if exit_criterion not in EXIT_CRITERIA:
        raise ValueError(f"unknown exit_criterion {exit_criterion!r}; choose one of {EXIT_CRITERIA}")
    if cache_budget is not None and cache_budget < 1:
        raise ValueError(f"cache_budget must be at least 1 (or None for no budget), got {cache_budget}")
    if idx.size(1) > cfg.block_size:
        raise ValueError(f"prompt of {idx.size(1)} tokens exceeds block_size {cfg.block_size}; crop it")
    len_prompt = idx.size(1)
    if not use_cache:
        if exit_criterion != "none" or warm_start or cache_budget is not None:
            raise ValueError("early exit, warm start and cache budget need use_cache=True")
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -cfg.block_size:], num_steps=num_steps, init_scale=init_scale)
            idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k)], dim=1)
            if stopped(idx, stop_ids, idx.size(1) - len_prompt):
                break
        return idx, [num_steps] * (idx.size(1) - len_prompt)
    max_len = min(cfg.block_size, idx.size(1) + max_new_tokens)
    cache, state = prefill(model, idx[:, :-1], max_len, num_steps, cache_budget, init_scale)
    steps_used = []
    for _ in range(max_new_tokens):
        if cache.pos == max_len:  # the context is full: start again from its last half (nanoGPT crops too)
            cache, state = prefill(model, idx[:, -(max_len // 2):-1], max_len, num_steps, cache_budget, init_scale)
        logits, state, steps = forward_cached(model, idx[:, -1:], cache, num_steps, exit_criterion, exit_threshold,
                                              state if warm_start else None, init_scale)
        idx = torch.cat([idx, sample_next(logits, temperature, top_k)], dim=1)
        steps_used.append(steps)
        if stopped(idx, stop_ids, idx.size(1) - len_prompt):
            break
    return idx, steps_used
