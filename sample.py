"""
Sample from a trained recurrent-depth model:

    python sample.py --out_dir=out-shakespeare-char --r 32
    python sample.py --start "FILE:prompt.txt" --exit_criterion kl --exit_threshold 5e-4 --warm_start
    python sample.py --init_from=huginn-0125 --chat --start "What is 17 * 24?" --r 32   # the released 3.5B model

--r sets the number of iterations of the core per token (more test-time compute); it defaults to the
model's mean_recurrence r_bar. Decoding uses the depth-aware KV cache of model.py (see generate there).
"""

import os
import pickle
import sys
import time

import torch

from configurator import configure, fail
from model import RecurrentConfig, RecurrentGPT, generate

# -----------------------------------------------------------------------------
init_from = "resume"  # "resume": load out_dir/ckpt.pt; "huginn-0125" or a folder in its layout: the released model
chat = False  # released model: --start is a user turn in its chat format, answered by "Huginn"
out_dir = "out"
r = None  # iterations of the core per token (num_steps); None: the model's r_bar
start = "\n"  # the prompt, or "FILE:path" to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0: greedy; below 1 sharper, above 1 more random
top_k = 200  # sample only from the k most likely tokens (0: all)
seed = 1337
device = ""  # "" picks cuda > mps > cpu; or "cpu", "cuda", "cuda:1", "mps"
dtype = ""  # "" means bfloat16 on CUDA (if supported), float32 elsewhere; or float32, bfloat16, float16
exit_criterion = "none"  # "kl" or "latent-diff": a token stops iterating once its prediction has converged
exit_threshold = 5e-4  # exit when the criterion is below this (the reference's model card uses 5e-4 with kl)
cache_budget = None  # keep only this many core KV entries (None: one per iteration and core layer)
warm_start = False  # start each token's state from the previous token's final state instead of noise
init_scale = 1.0  # std of the noise start s_0, relative to training (0: the zero state)
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list, tuple, type(None)))}
config = configure(settings, sys.argv[1:])
globals().update(config)
# -----------------------------------------------------------------------------


def load_model(init_from, out_dir, device, dtype):
    """The model and its tokenizer meta: our checkpoint, or the released Huginn-0125 (or a folder in its layout)."""
    if init_from != "resume":
        try:  # needs the extras (pip install safetensors huggingface_hub tokenizers); errors in one line
            folder = RecurrentGPT.pretrained_folder(init_from)
            # the weights themselves in dtype (the authors evaluate in pure bfloat16), not float32 + autocast
            model = RecurrentGPT.from_pretrained(folder, device=device, dtype=dtype)
        except (ImportError, OSError, ValueError, KeyError) as err:
            fail(str(err.args[0]) if err.args else repr(err))
        return model, {"tokenizer": "huginn", "folder": folder}
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first (python train.py ...) or point --out_dir at one")
    try:  # a truncated or foreign file: say so in one line instead of a traceback
        ckpt = torch.load(path, map_location="cpu")
        model = RecurrentGPT(RecurrentConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        meta = ckpt["meta"]
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, pickle.UnpicklingError) as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        fail(f"{path} is not a readable checkpoint ({type(err).__name__}: {first_line}); retrain or restore a copy")
    return model.to(device).eval(), meta


def get_tokenizer(meta):
    """encode(str) -> list of ids and decode(ids) -> str for the tokenizer the checkpoint names."""
    if meta.get("tokenizer") == "char":
        chars = meta["chars"]
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                fail(f"the prompt has characters the model's vocabulary lacks: {''.join(unknown)!r}")
            return [stoi[c] for c in text]

        # a vocabulary padded beyond the characters can (rarely) sample an id with no character
        return encode, lambda ids: "".join(chars[i] for i in ids if i < len(chars))
    if meta.get("tokenizer") == "r50k_base":
        import tiktoken
        enc = tiktoken.get_encoding("r50k_base")
        encode = lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})
        return encode, lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])
    if meta.get("tokenizer") == "huginn":  # the released BPE tokenizer, a Hugging Face tokenizer.json
        try:
            from tokenizers import Tokenizer
        except ImportError:
            fail("the released tokenizer needs: pip install tokenizers")
        path = os.path.join(meta["folder"], "tokenizer.json")
        if not os.path.isfile(path):
            fail(f"no tokenizer.json in {meta['folder']}")
        tok = Tokenizer.from_file(path)
        # special tokens written in the text (<|begin_text|>, <|end_turn|>, ...) are read as their ids
        return (lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(ids, skip_special_tokens=False))
    fail(f"unknown tokenizer {meta.get('tokenizer')!r} in the checkpoint meta (expected 'char' or 'r50k_base')")


# checks on the settings that would otherwise fail deep inside generate
if r is not None and (not isinstance(r, int) or r < 1):
    fail(f"--r must be a whole number of iterations >= 1, got {r!r}")
if cache_budget is not None and (not isinstance(cache_budget, int) or cache_budget < 1):
    fail(f"--cache_budget must be a whole number >= 1 (or None), got {cache_budget!r}")
if exit_criterion not in ("none", "kl", "latent-diff"):
    fail(f"--exit_criterion must be none, kl or latent-diff, got {exit_criterion!r}")
if top_k < 0:
    fail(f"--top_k must be >= 0 (0: no limit), got {top_k}")
if max_new_tokens < 1:
    fail(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
if temperature < 0:
    fail(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
if not device:
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
device_type = device.split(":")[0]
if not dtype:
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
if chat and init_from == "resume":
    fail("--chat is for the released model: add --init_from=huginn-0125 (or a folder in its layout)")

torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
if device_type == "cuda" and not torch.cuda.is_available():
    fail(f"--device={device} but CUDA is not available here; use --device=cpu")
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)

model, meta = load_model(init_from, out_dir, device, ptdtype)
encode, decode = get_tokenizer(meta)
num_steps = model.config.mean_recurrence if r is None else r

if start.startswith("FILE:"):
    prompt_path = start[len("FILE:"):]
    if not os.path.isfile(prompt_path):
        fail(f"prompt file {prompt_path!r} not found")
    with open(prompt_path, encoding="utf-8") as f:
        start = f.read()
if "row_len" in meta:
    # A reasoning model (prepare_data.py reasoning / problems) labels every position of its input: it answers a
    # problem instead of continuing text. Without --start it answers the example problems saved in its meta.
    problems = meta.get("examples", []) if start == "\n" else [(None, start.strip("\n"), "")]
    if not problems:
        fail("this checkpoint saved no example problems; give one with --start, e.g. --start 0123")
    for difficulty, problem, answer in problems:
        ids = torch.tensor(encode("\n" + problem), device=device)[None, -model.config.block_size:]  # "\n" leads, as in training
        with torch.no_grad(), autocast:
            logits, _ = model(ids, num_steps=num_steps, init_scale=init_scale)  # (1, T, vocab)
        predicted = decode(logits[0].argmax(-1).tolist())[-len(answer or problem):]  # the answer labels the last chars
        verdict = f"  (difficulty {difficulty}, expected {answer}: {'right' if predicted == answer else 'wrong'})"
        shown = predicted.replace("\n", "\\n")  # an untrained model may answer with line breaks
        print(f"{problem} -> {shown}{verdict if answer else ''}")
    print(f"--- answered at r = {num_steps} iterations (r_bar {model.config.mean_recurrence}); try another --r")
    sys.exit()

stop_ids = []
if meta["tokenizer"] == "huginn":  # the released model's text starts with <|begin_text|>; --chat adds a user turn
    if chat:  # the reference's chat template: a header per turn, each turn closed by <|end_turn|>
        start = (f"<|begin_header|>user<|end_header|>\n\n{start.strip()}<|end_turn|>"
                 "<|begin_header|>Huginn<|end_header|>\n\n")
    start = "<|begin_text|>" + start
    stop_ids = [encode("<|end_text|>")[0], encode("<|end_turn|>")[0]]  # 65505, 65508: where a reply ends
start_ids = encode(start)
if not start_ids:
    fail("the prompt is empty; give at least one token with --start")
if len(start_ids) > model.config.block_size:
    print(f"warning: the prompt has {len(start_ids)} tokens, more than block_size {model.config.block_size}; "
          f"keeping the last {model.config.block_size}", file=sys.stderr)
    start_ids = start_ids[-model.config.block_size:]
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :]  # (1, T)
print(f"{init_from} {out_dir}: {model.get_num_params() / 1e6:.2f}M parameters, r_bar {model.config.mean_recurrence}; "
      f"decoding at r = {num_steps}, temperature {temperature}, top_k {top_k}, exit {exit_criterion} "
      f"(threshold {exit_threshold}), cache_budget {cache_budget}, warm_start {warm_start}, init_scale {init_scale}")

for k in range(num_samples):
    t0 = time.time()
    with autocast:
        y, steps_used = generate(model, x, max_new_tokens, num_steps=num_steps, temperature=temperature,
                                 top_k=top_k or None, exit_criterion=exit_criterion, exit_threshold=exit_threshold,
                                 cache_budget=cache_budget, warm_start=warm_start, init_scale=init_scale,
                                 stop_ids=stop_ids)
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    new_ids = y[0, x.size(1):].tolist()
    end = next((i for i, t in enumerate(new_ids) if t in stop_ids), len(new_ids))  # the reply ends at an end token
    print(decode(x[0].tolist() + new_ids[:end]))
    mean_steps = sum(steps_used) / len(steps_used)
    print(f"--- sample {k + 1}: {len(new_ids)} tokens in {dt:.2f} s ({len(new_ids) / dt:.1f} tokens/s), "
          f"mean {mean_steps:.2f} iterations per token (r = {num_steps})")
