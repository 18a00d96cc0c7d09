"""
Models from disk, with their tokenizers: our own checkpoints (train.py's out_dir/ckpt.pt) and the released
Huginn-0125 (Hugging Face `tomg-group-umd/huginn-0125`, or any folder in its layout: config.json + *.safetensors).

    from checkpoints import from_pretrained
    model = from_pretrained("huginn-0125", device="cuda", dtype=torch.bfloat16)
    logits, _ = model(idx, num_steps=32)

Loading the release is renaming: every tensor layout (fused Wqkv, interleaved RoPE pairs, qk_bias, gate-then-value
`fc`, the adapter's [state, e] order) is already the reference's. Extras: pip install huggingface_hub (to download)
and tokenizers (to read its tokenizer).
"""

import atexit
import json
import os
import socket
import zipfile

import torch
import torch.nn as nn

from common import keyed_generator
from configurator import fail
from dataloader import checkpoint_data, data_folder
from decode import load_gate
from finetune import merge_lora
from linear_kernels import calibration_hessians, memory_bytes, quantize_int8, weight_bytes
from model import RecurrentConfig, RecurrentGPT, precompute_rope


TRAIN_KEYS = {"model_config", "meta", "config", "iter_num"}  # what train.py writes into every checkpoint, besides
# "model" (the weights) or, for a LoRA run, "lora" (the adapters) with "base" (the released model they adapt)


def read_checkpoint(path, device="cpu", flag="--out_dir", mmap=False):
    """The dict train.py saved at path, or one line that says why it cannot be read. mmap=True maps the file instead
    of reading it: what is never used (the optimizer's state, when sampling) is never read."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first (python train.py ...) or point {flag} at one")
    try:
        # (only a zip can be mapped: anything else gets torch.load's own reason below)
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # a truncated zip, random bytes, a foreign pickle: each has its own exception type
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        fail(f"{path} is not a readable checkpoint ({type(err).__name__}{': ' + reason if reason else ''}); "
             "retrain, or restore a copy")
    if not (isinstance(checkpoint, dict) and TRAIN_KEYS <= checkpoint.keys() and {"model", "lora"} & checkpoint.keys()):
        fail(f"{path} is not a checkpoint written by train.py; retrain, or restore a copy")
    return checkpoint


def load_checkpoint(out_dir, device="cpu", flag="--out_dir"):
    """The model of out_dir/ckpt.pt in eval mode, and the checkpoint (its meta, train.py's config, ...)."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = read_checkpoint(path, "cpu", flag, mmap=True)
    if "lora" in checkpoint:  # the released model it adapts, with the adapters folded into its weights
        model, _ = load_released(checkpoint["base"], "cpu", torch.float32)
        lora = checkpoint["lora_config"]
        merge_lora(model.state_dict(), checkpoint["lora"], lora["rank"], lora["alpha"])  # in place: shared storage
        for k in ("mean_recurrence", "backprop_depth", "sigma"):  # the fine-tuning objective's
            setattr(model.config, k, checkpoint["model_config"][k])
    else:
        try:  # the weights must fit the architecture the checkpoint names
            model = RecurrentGPT(RecurrentConfig(**checkpoint["model_config"]))
            model.load_state_dict(checkpoint["model"])
            if "rope" in checkpoint:  # a fine-tune of the release: the RoPE table it trained with, the release's
                model.rope = checkpoint["rope"]
        except (TypeError, ValueError, RuntimeError) as err:
            fail(f"{path} does not hold a model this code can build ({type(err).__name__}: "
                 f"{(str(err).strip().splitlines() or [''])[0][:200]}); retrain, or restore a copy")
    gate = os.path.join(out_dir, "exit_gate.pt")
    if os.path.isfile(gate):  # exits.py's learned exit, for generate(..., exit_criterion="gate")
        try:
            exit_gate = load_gate(gate)
        except Exception as err:  # as for ckpt.pt: a damaged file has many ways to fail
            fail(f"{gate} is not a readable exit gate ({type(err).__name__}); fit it again: python exits.py "
                 f"--out_dir={out_dir}")
        if exit_gate["fitted_on"] in (None, fitted_on(checkpoint)):  # not a gate fit on an earlier checkpoint
            model.exit_gate = exit_gate
    return model.to(device).eval(), checkpoint


def trained_init_scale(checkpoint, meta=None):
    """The noise start a model trained with, the scripts' default: train.py's setting in a checkpoint; for a folder in
    the released layout (checkpoint None), the init_scale export.py wrote in its config.json (load_released's meta).
    1, the paper's and the release's, where neither names one."""
    return checkpoint["config"].get("init_scale", 1.0) if checkpoint else (meta or {}).get("init_scale", 1.0)


def quantize_checkpoint(model, checkpoint, calibration_tokens, data_dir="", data=None):
    """--quantize int8 for a checkpoint, in place: GPTQ fits the int8 weights to the float model's products on
    calibration_tokens tokens of its training data (the train split: what eval.py scores is val); 0: every weight
    rounded to nearest. A release is quantized as its weights stream in (from_pretrained): rounded to nearest.
    data: that data, where the caller has read it already (its checks read every token)."""
    hessians = None
    if calibration_tokens:
        folder = data_folder(checkpoint, data_dir)
        if data is None and not os.path.isfile(os.path.join(folder, "meta.json")):
            fail(f"--quantize int8 fits its weights to {calibration_tokens} tokens of the data the checkpoint trained "
                 f"on (GPTQ), and {folder} has none: prepare it again (prepare_data.py), or add --calibration_tokens=0 "
                 "to round every weight to nearest instead")
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        statistics = sum(4 * module.in_features ** 2 for module in linears)  # X^T X of each, float32, all at once
        weights = weight_bytes(model)
        if model.rope.device.type == "cpu" and weights + statistics > memory_bytes():
            fail(f"--quantize int8: GPTQ's statistics ({statistics / 1e9:.1f} GB) and the model ({weights / 1e9:.1f} "
                 "GB) do not fit in this machine's memory; add --calibration_tokens=0 to round to nearest")
        if data is None:
            data = checkpoint_data(checkpoint, data_dir)
        blocks = data.evenly_spaced("train", -(-calibration_tokens // data.block_size), once=True)
        print(f"int8: GPTQ fits {len(linears)} layers to {len(blocks) * data.block_size} training tokens (a second for "
              "a small model, 4 minutes for one 17920 wide on a CPU core; --calibration_tokens=0 rounds to nearest)")
        x, _ = data.batch("train", blocks)
        device = model.rope.device
        hessians = calibration_hessians(model, x.to(device), trained_init_scale(checkpoint),
                                        keyed_generator(checkpoint["config"]["seed"], -6, device=device))
    return quantize_int8(model, hessians=hessians)


def fitted_on(checkpoint):
    """What exits.py records of the checkpoint it fit a gate on: a gate learned on other weights is not used."""
    return {"iter_num": checkpoint["iter_num"], "best_val_loss": checkpoint.get("best_val_loss")}


def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: os.replace is atomic, so a crash or kill -9 at any moment leaves
    either the old checkpoint or the new one, never half a file. A failed write (a full disk) removes its
    temporary file and stops with one line; the last good checkpoint stays."""
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so even a power cut cannot leave a torn file
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        failed = err if isinstance(err, OSError) else err.__context__  # torch's zip writer wraps a failed write
        if not isinstance(failed, OSError):
            raise
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        kept = f"the last good one, {path}, is kept" if os.path.isfile(path) else "there is no earlier one"
        fail(f"could not save the checkpoint ({failed.strerror or failed}); {kept}")


def lock_run_folder(out_dir):
    """Keep a second run out of a folder that one is using: an exclusive lock on out_dir/run.lock for the life of
    this process. The kernel releases it when the process ends, however it ends, so a crash leaves no stale lock
    (the file still names the dead run, and the next run says it takes over). A POSIX lock (lockf) belongs to the
    process, so the same process may take it again. Returns the lock file's descriptor; keep it open."""
    try:
        import fcntl
    except ImportError:  # Windows has no fcntl: no lock, said once
        print(f"note: no file locks on this system; make sure no other run uses {out_dir}")
        return None
    path = os.path.join(out_dir, "run.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        fail(f"{out_dir} is in use by another run ({holder or 'a running process'}); wait for it to end, or choose "
             "another --out_dir")
    if holder:  # a run that ended normally clears the file: this one crashed or was killed
        print(f"note: taking over {path} from {holder}, which is no longer running")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    atexit.register(os.ftruncate, fd, 0)  # a normal end (or fail()) leaves an empty file: nothing to take over
    return fd


def get_tokenizer(meta):
    """encode(str) -> ids and decode(ids) -> str for the tokenizer a checkpoint's meta names."""
    if meta.get("tokenizer") == "char":
        chars = meta["chars"]
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                fail(f"the prompt has characters the model's vocabulary lacks: {''.join(unknown)!r}")
            return [stoi[c] for c in text]

        return encode, lambda ids: "".join(chars[i] for i in ids if i < len(chars))  # padding ids have no text
    if meta.get("tokenizer") == "r50k_base":
        import tiktoken
        enc = tiktoken.get_encoding("r50k_base")
        return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}),
                lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))
    if meta.get("tokenizer") == "huginn":  # the released BPE tokenizer, a Hugging Face tokenizer.json
        try:
            from tokenizers import Tokenizer
        except ImportError:
            fail("the released tokenizer needs: pip install tokenizers")
        if "tokenizer_json" in meta:  # a checkpoint carries its data's (dataloader.py): nothing else to find
            tokenizer = Tokenizer.from_str(meta["tokenizer_json"])
        elif os.path.isfile(os.path.join(meta["folder"], "tokenizer.json")):  # the release's folder
            tokenizer = Tokenizer.from_file(os.path.join(meta["folder"], "tokenizer.json"))
        else:
            fail(f"no tokenizer.json in {meta['folder']}: a model in the released layout needs the release's tokenizer "
                 "(export.py writes it only for models that read its tokens)")
        # special tokens written in the text (<|begin_text|>, <|end_turn|>, ...) are read as their ids
        return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    fail(f"unknown tokenizer {meta.get('tokenizer')!r} in the checkpoint meta (expected char or r50k_base)")


# -----------------------------------------------------------------------------------------------------------
# the released Huginn-0125

# our config fields -> the keys of the released config.json
CONFIG_KEYS = dict(vocab_size="vocab_size", block_size="block_size", n_embd="n_embd", n_head="n_heads",
                   n_layers_prelude="n_layers_in_prelude", n_layers_core="n_layers_in_recurrent_block",
                   n_layers_coda="n_layers_in_coda", intermediate_size="intermediate_size",
                   mean_recurrence="mean_recurrence", backprop_depth="mean_backprop_depth", rope_base="rope_base",
                   norm_eps="norm_eps", qk_bias="qk_bias", tie_embeddings="tie_embeddings")
# our modules -> the released weight names. Only the prefixes differ: inside a block the names (norm_1, attn.Wqkv,
# attn.qk_bias, attn.proj, norm_2, norm_3, mlp.fc, mlp.proj, norm_4) are the reference's
MODULE_NAMES = dict(wte="transformer.wte", prelude="transformer.prelude", adapter="transformer.adapter",
                    core="transformer.core_block", coda="transformer.coda", ln_f="transformer.ln_f", lm_head="lm_head")
# variants of the reference code that model.py does not implement, and the value Huginn-0125 has
REQUIRED = dict(bias=False, injection_type="linear", state_init="like-init", test_time_noise=0)


def released_name(name):
    """Our parameter name -> the released one: core.3.mlp.fc.weight -> transformer.core_block.3.mlp.fc.weight"""
    module, rest = name.split(".", 1)
    return f"{MODULE_NAMES[module]}.{rest}"


def released_layout(folder):
    """Whether folder holds a model in the released layout: config.json beside *.safetensors (a run folder of ours
    holds a config.json too, of its settings, beside ckpt.pt)."""
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(folder))


def pretrained_folder(name_or_path, weights=True):
    """A local folder in the released layout; `huginn-0125` is downloaded once (then cached) from the hub, its
    weights only if asked for (without them: config.json and the tokenizer's files, a few MB)."""
    if os.path.isdir(name_or_path):  # by its absolute path: a fine-tune records it, to be found from anywhere
        return os.path.abspath(name_or_path)
    if name_or_path not in ("huginn-0125", "tomg-group-umd/huginn-0125"):
        raise FileNotFoundError(f"{name_or_path}: no such folder; give a folder with config.json and "
                                "*.safetensors, or huginn-0125 to download the released model")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading huginn-0125 needs: pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors"] if weights else ["*.json"]
    try:  # config.json, tokenizer.json, the safetensors shards and their index: ~16 GB (float32)
        return snapshot_download("tomg-group-umd/huginn-0125", allow_patterns=patterns)
    except OSError as err:  # offline, or the hub unreachable: the hub's message spans lines; its first says why
        why = (str(err).strip() or repr(err)).splitlines()[0]
        raise OSError(f"could not download huginn-0125 ({why}); check the connection, or give a local copy: a folder "
                      "with config.json and *.safetensors") from None


def read_json(path):
    """A JSON file of a released folder; one cut short (a partial download) names itself."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise ValueError(f"{path} does not read as JSON ({err}); download or export it again") from None


def pretrained_config(folder):
    """RecurrentConfig from a released config.json; keys it lacks keep our (= the released) defaults."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(os.path.join(folder, "ckpt.pt")):  # its config.json holds train.py's settings
        raise FileNotFoundError(f"{folder} is a training run (ckpt.pt), not a model in the released layout: read it "
                                "with --out_dir")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; a pretrained folder holds config.json and *.safetensors")
    released = read_json(path)
    for key, value in REQUIRED.items():
        if released.get(key, value) != value:
            raise ValueError(f"{path}: {key}={released[key]!r} is not supported here (Huginn-0125 has {value!r})")
    return RecurrentConfig(**{ours: released[theirs] for ours, theirs in CONFIG_KEYS.items() if theirs in released})


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors(path):
    """(name, tensor) for every tensor of a .safetensors file, each read into memory of its own. The format is 8
    bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes. Read here
    rather than memory-mapped by the safetensors package: no file stays mapped, so a tensor that is converted
    (linear_kernels.py: int8, packed) or dropped frees its memory at once: the process holds one copy of the weights."""
    with open(path, "rb") as f:
        try:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (ValueError, MemoryError, OverflowError):  # not JSON: a broken or foreign file
            raise ValueError(f"{path} is not a safetensors file (its header does not read)") from None
        start = f.tell()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {info.get('dtype')}, not one of {list(SAFETENSORS_DTYPES)}")
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            if end - begin != tensor.nbytes or f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                raise ValueError(f"{path}: {name} is cut short or its size does not match its shape; download it again")
            yield name, tensor


def stored_tensors(folder):
    """(name, tensor) of every tensor of a released checkpoint, shard by shard, one tensor at a time."""
    index = os.path.join(folder, "model.safetensors.index.json")  # present when the weights are sharded
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
    else:
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
    if missing:  # a download cut short
        raise FileNotFoundError(f"{folder}: {missing[0]} is missing ({len(missing)} of the {len(shards)} shards its "
                                "index names); download or export it again")
    for shard in shards:
        yield from read_safetensors(os.path.join(folder, shard))


def from_pretrained(name_or_path, device="cpu", dtype=torch.float32, quantize=None):
    """RecurrentGPT with the released weights, for inference: eval mode, no gradients. quantize="int8": int8 weights
    (linear_kernels.py), each Linear quantized as soon as it is read, so the float copy never exists all at once."""
    folder = pretrained_folder(name_or_path)
    config = pretrained_config(folder)
    with torch.device("meta"):  # no memory and no random init: the checkpoint's tensors become the parameters
        model = RecurrentGPT(config)
    ours = {released_name(name): name for name in model.state_dict()}
    missing = set(ours.values()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    rope = None
    for stored, tensor in stored_tensors(folder):
        if stored == "freqs_cis":
            rope = model_rope(folder, config, tensor, device)
            continue
        if stored == "lm_head.weight" and config.tie_embeddings:
            continue  # the release stores a second copy of the tied embedding
        if stored not in ours:
            raise ValueError(f"{folder}: unexpected tensor {stored} in the checkpoint")
        name = ours[stored]
        if name not in missing:
            raise ValueError(f"{folder}: {stored} is stored twice (in more than one shard)")
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        expected = getattr(module, attribute).shape
        if tensor.shape != expected:
            raise ValueError(f"{folder}: {stored} has shape {tuple(tensor.shape)}, but config.json implies "
                             f"{tuple(expected)}")
        setattr(module, attribute, nn.Parameter(tensor.to(device, dtype), requires_grad=False))
        missing.discard(name)
        if quantize and isinstance(module, nn.Linear) and module_name != "lm_head":
            quantize_int8(model, names=[module_name])
    if missing:
        raise KeyError(f"{folder}: checkpoint has no {released_name(sorted(missing)[0])} (our {sorted(missing)[0]})")
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.rope = rope if rope is not None else model_rope(folder, config, None, device)  # built on the meta device
    if quantize:
        quantize_int8(model, names=["lm_head"])  # and a tied embedding reads it
    # inference only: without this, model(idx) outside torch.no_grad() would build a graph over the last k steps
    return model.requires_grad_(False).eval()


RELEASE_ERRORS = (ImportError, OSError, ValueError, KeyError)  # what reading a release raises, with its reason


def load_released(name_or_path, device, dtype, quantize=None):
    """For the scripts: from_pretrained with its errors in one line; the model, and a meta naming its tokenizer."""
    try:  # needs the extras: pip install huggingface_hub (to download) tokenizers (to read the tokenizer)
        folder = pretrained_folder(name_or_path)
        model = from_pretrained(folder, device=device, dtype=dtype, quantize=quantize)
    except RELEASE_ERRORS as err:
        fail(str(err.args[0]) if err.args else repr(err))
    # config.json again: RecurrentConfig keeps no noise start. An exported model's (export.py); the release names none
    init_scale = read_json(os.path.join(folder, "config.json")).get("init_scale", 1.0)
    return model, {"tokenizer": "huginn", "folder": folder, "init_scale": init_scale}


def released_config(name_or_path):
    """For the scripts: a release's RecurrentConfig from its config.json alone, before its weights are read or
    downloaded (what must fit it is checked first), with its errors in one line."""
    try:
        return pretrained_config(pretrained_folder(name_or_path, weights=False))
    except RELEASE_ERRORS as err:
        fail(str(err.args[0]) if err.args else repr(err))


def model_rope(folder, config, stored, device):
    """The RoPE table to run with: the release's own freqs_cis (1, T, 1, hd/2, 2) when it has one, as the reference
    does (it is a persistent buffer there), else ours. The stored table is checked against ours loosely: a table
    computed on another device differs in the last bits (far positions magnify one ulp of a frequency), while a
    wrong block_size or rope_base differs in shape or by far more."""
    # (T, hd/2, 2), float32, compared on the CPU where the stored table was read, then moved to the model's device
    rope = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_base)
    if stored is not None:
        if stored.numel() != rope.numel() or not torch.allclose(stored.float().view_as(rope), rope, atol=1e-2):
            raise ValueError(f"{folder}: the stored RoPE table freqs_cis {tuple(stored.shape)} does not match "
                             f"block_size {config.block_size} and rope_base {config.rope_base}")
        rope = stored.float().view_as(rope).contiguous()
    return rope.to(device)

