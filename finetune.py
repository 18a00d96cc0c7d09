"""
Fine-tuning the released Huginn-0125 (train.py --init_from=huginn-0125): LoRA adapters, the memory plan, FSDP2.

The objective stays the pretraining one (the maintainers' advice): a random r per iteration around r_bar, truncated
backprop through the last k steps. What changes is how the 3.5B parameters fit:
- full fine-tuning: float32 weights, gradients and AdamW's two moments, 16 bytes a parameter: an 80 GB card;
- LoRA (lora_rank > 0): the base frozen (bf16 on a GPU), low-rank adapters B A on chosen Linear layers trained,
  through peft (pip install peft): a 24 GB card;
- FSDP2 under torchrun (fsdp=True): weights, gradients and optimizer state sharded over the processes;
- activation_checkpointing: each step of the core recomputed in backward, so the activations of k steps are not
  all kept at once.
"""

import re

import torch

# the Linear layers of each group, by name (lora_modules picks groups)
LORA_GROUPS = {"prelude": r"prelude\.\d+\.(attn\.(Wqkv|proj)|mlp\.(fc|proj))",
               "core": r"core\.\d+\.(attn\.(Wqkv|proj)|mlp\.(fc|proj))",
               "coda": r"coda\.\d+\.(attn\.(Wqkv|proj)|mlp\.(fc|proj))",
               "adapter": r"adapter"}  # not lm_head: it is the embedding too (tied), and an adapter would split them


def lora_pattern(groups):
    """A regular expression for the names of the Linear layers of groups (e.g. "core,adapter")."""
    names = [g for g in groups.split(",") if g]
    unknown = set(names) - set(LORA_GROUPS)
    if unknown or not names:
        raise ValueError(f"lora_modules is a comma-separated list of {', '.join(LORA_GROUPS)}; got {groups!r}")
    return "(" + "|".join(LORA_GROUPS[g] for g in names) + ")"


def add_lora(model, rank, alpha, groups):
    """LoRA adapters on the Linear layers of groups, in place (peft); everything else is frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install peft") from None
    pattern, names = lora_pattern(groups), [name for name, _ in model.named_modules()]
    empty = [g for g in groups.split(",") if g and not any(re.fullmatch(LORA_GROUPS[g], n) for n in names)]
    if empty:  # (a model without prelude or coda blocks)
        raise ValueError(f"lora_modules: this model has no {' or '.join(empty)} layers to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0)
    model.requires_grad_(False)
    model = inject_adapter_in_model(config, model)  # the adapters' parameters are the only trainable ones
    for p in model.parameters():  # peft makes them in the base's dtype: float32 keeps AdamW's small updates
        if p.requires_grad:       # (in bf16 most would round away)
            p.data = p.data.float()
    return model


def lora_state(weights):
    """The adapters of a state_dict only, under peft's saved names: {"<layer>.lora_A.weight": (rank, in),
    "<layer>.lora_B.weight": (out, rank)}."""
    return {name.replace(".default", ""): tensor for name, tensor in weights.items() if ".lora_" in name}


def load_lora_state(model, adapters):
    """Put saved adapters (lora_state) back into a model that add_lora prepared."""
    named = {name.replace(".weight", ".default.weight"): tensor for name, tensor in adapters.items()}
    missing, unexpected = model.load_state_dict(named, strict=False)
    if unexpected or any(".lora_" in name for name in missing):
        raise ValueError(f"the checkpoint's adapters do not fit this model (e.g. {(unexpected or missing)[0]})")


def merge_lora(weights, adapters, rank, alpha):
    """Fold adapters into plain weights, in place, without peft: W += (alpha / rank) B A for every adapted layer.
    weights: our state_dict names ("core.0.mlp.fc.weight"), adapters: lora_state's."""
    for name, A in adapters.items():
        if name.endswith("lora_A.weight"):
            layer = name[:-len(".lora_A.weight")]
            B = adapters[f"{layer}.lora_B.weight"]
            weight = weights[f"{layer}.weight"]
            weight += (alpha / rank) * (B.float() @ A.float()).to(weight.dtype)
    return weights


def shard(model):
    """FSDP2: every block, then the rest, sharded over the processes (weights, gradients, optimizer state)."""
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    for block in [*model.prelude, *model.core, *model.coda]:
        fully_shard(block)
    return fully_shard(model)


def memory_plan(model, batch_size, block_size, dtype_bytes, shards=1, checkpointing=False):
    """Bytes each part of a training iteration holds per process, from the model's shapes: weights, gradients and
    AdamW's moments (float32) of what trains, split across `shards` processes by FSDP (plain DDP keeps them whole in
    each), and the activations one micro-batch keeps for backward. An estimate (what each block keeps for backward,
    counted from its operations), checked against the measured peak."""
    cfg = model.config
    h, inter, tokens = cfg.n_embd, cfg.intermediate_size, batch_size * block_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a block keeps, per token: its 4 norms' inputs and outputs (8h), q, k, v, the attention output (4h), the
    # SwiGLU's fc output, gate and product (4 inter) and its two residual sums (2h), in the compute dtype
    block = (14 * h + 4 * inter) * dtype_bytes
    k = cfg.backprop_depth
    core = cfg.n_layers_core * block + 2 * h * dtype_bytes  # one step: its blocks and the adapter's input [s, e]
    steps = (2 * h * dtype_bytes * k + core) if checkpointing else k * core  # checkpointed: inputs of each step
    activations = tokens * ((cfg.n_layers_prelude + cfg.n_layers_coda) * block + steps)
    activations += tokens * cfg.vocab_size * 4 * 2  # the float32 logits and their gradient
    plan = {"weights": weights / shards, "gradients": 4 * trainable / shards, "optimizer": 8 * trainable / shards,
            "activations": activations}
    plan["total"] = sum(plan.values())
    return plan


def peak_memory(device):
    """The peak memory of this process so far: the CUDA allocator's, else the resident set's (Linux VmHWM)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def describe(plan):
    return ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in plan.items())
