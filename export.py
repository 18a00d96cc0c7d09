"""
Write a checkpoint in Huginn-0125's released layout, so the ecosystem can read it: the reference's own modeling
code (AutoModelForCausalLM with trust_remote_code), lm-eval's HF path, the vLLM plugin, and checkpoints.from_pretrained.

    python export.py --out_dir=out-gsm8k --to=huginn-gsm8k        # a fine-tuned release (LoRA adapters merged)
    python export.py --out_dir=out --to=my-model                   # a model trained here from scratch (weights and
                                                                   # config only: no file holds char or r50k tokens)

Writes config.json (the reference's keys), model.safetensors or shards of at most --shard_gb with
model.safetensors.index.json (the reference's tensor names; the RoPE table freqs_cis too, as released; lm_head is
tied to the embedding and not stored twice), and the tokenizer's files with generation_config.json (the chat template
and the stop tokens) where the base or the data has them. Needs safetensors.
"""

import json
import os
import shutil
import sys

import torch

from checkpoints import CONFIG_KEYS, load_checkpoint, read_json, released_name, trained_init_scale
from common import writable_dir
from configurator import configure, fail, number

# -----------------------------------------------------------------------------------------------------------
out_dir = "out"   # the checkpoint to export (train.py's out_dir)
to = ""           # the folder to write
shard_gb = 5.0    # at most this many GB per safetensors file
dtype = ""        # "" keeps the weights' dtype; or float32, bfloat16
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

number(config, "shard_gb", above=0)
if not to:
    fail("give the folder to write with --to=FOLDER")
if dtype not in ("", "float32", "bfloat16"):
    fail(f"--dtype must be float32 or bfloat16 (or empty: as trained), got {dtype!r}")
if os.path.isdir(to) and any(name == "config.json" or ".safetensors" in name for name in os.listdir(to)):
    # config.json is written last: shards without it are an export cut short, which readers would take for a model
    fail(f"{to} already holds a model's files (config.json or *.safetensors); choose another --to, or empty it")
try:
    from safetensors import SafetensorError
    from safetensors.torch import save_file
except ImportError:
    fail("writing safetensors needs: pip install safetensors")
writable_dir(to, "--to")
model, checkpoint = load_checkpoint(out_dir)  # LoRA adapters are folded into the base's weights here

# config.json: the release's own (keys our config does not know stay as released), with our values on top
released, base_config = {}, os.path.join(checkpoint["base"], "config.json") if checkpoint.get("base") else ""
if os.path.isfile(base_config):
    try:
        released = read_json(base_config)
    except ValueError as err:  # cut short (a download stopped): one line that names it, not a JSON traceback
        fail(str(err))
elif base_config:  # a full fine-tune holds every weight, so only the keys our config does not know are missing
    print(f"warning: {base_config} is gone; config.json holds this model's settings only", file=sys.stderr)
ours = {theirs: getattr(model.config, key) for key, theirs in CONFIG_KEYS.items()}
released.update(ours, n_layers=model.config.n_layers_prelude + model.config.n_layers_core + model.config.n_layers_coda,
                architectures=["RavenForCausalLM"], model_type="huginn_raven", bias=False, injection_type="linear",
                state_init="like-init", torch_dtype=dtype or str(model.wte.weight.dtype).replace("torch.", ""),
                init_scale=trained_init_scale(checkpoint))  # the noise start it trained with: ours read it back
# the reference's modeling code by its hub name: a local name (the hub's own config.json may have one) would need its
# .py files beside the weights, which are not downloaded
released["auto_map"] = {"AutoConfig": "tomg-group-umd/huginn-0125--raven_config_minimal.RavenConfig",
                        "AutoModelForCausalLM": "tomg-group-umd/huginn-0125--raven_modeling_minimal.RavenForCausalLM"}

# the tensors under the released names, cut into shards in the release's order
tensors = {released_name(name): t.detach().to(getattr(torch, dtype) if dtype else t.dtype).contiguous()
           for name, t in model.state_dict().items() if not (name == "lm_head.weight" and model.config.tie_embeddings)}
tensors["freqs_cis"] = model.rope[None, :, None].contiguous()  # (1, T, 1, hd/2, 2), float32, as the reference keeps it
shards, size = [{}], 0
for name, t in tensors.items():
    if size and size + t.nbytes > shard_gb * 1e9:
        shards.append({})
        size = 0
    shards[-1][name] = t
    size += t.nbytes
files = ["model.safetensors"] if len(shards) == 1 else \
    [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
for file, shard in zip(files, shards):
    try:
        save_file(shard, os.path.join(to, file), metadata={"format": "pt"})
    except (SafetensorError, OSError) as err:  # a full disk: no config.json is written, so no reader takes it
        fail(f"could not write {os.path.join(to, file)} ({err}); free some space, empty {to} and export again")
if len(shards) > 1:
    with open(os.path.join(to, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                   "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}, f, indent=1)
with open(os.path.join(to, "config.json"), "w") as f:
    json.dump(released, f, indent=1)
# the tokenizer and what reads it (the chat template, the stop tokens): the base's files, else the tokenizer the
# checkpoint carries (a model trained here on chat data)
meta, base, copied = checkpoint["meta"], checkpoint.get("base"), []
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
    if base and os.path.isfile(os.path.join(base, name)):
        shutil.copy(os.path.join(base, name), os.path.join(to, name))
        copied.append(name)
if "tokenizer.json" not in copied and "tokenizer_json" in meta:
    with open(os.path.join(to, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(meta["tokenizer_json"])
    copied.append("tokenizer.json")
if "tokenizer.json" not in copied:  # char or r50k_base: the layout's readers (ours too) need the release's tokenizer
    print(f"warning: no tokenizer.json: this model reads {meta['tokenizer']} tokens, which the released layout has no "
          f"file for; sample it from its run folder (python sample.py --out_dir={out_dir})", file=sys.stderr)
size = sum(t.nbytes for t in tensors.values()) / 1e9
print(f"wrote {to}: {len(tensors)} tensors in {len(files)} file(s), {size:.2f} GB, {model.get_num_params():,} "
      f"parameters{''.join(', ' + name for name in copied)}")
