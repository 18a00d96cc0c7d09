"""
Sample from a trained recurrent-depth model:

    python sample.py --out_dir=out-shakespeare-char --r 32
    python sample.py --out_dir=out-shakespeare-char --r 32 --temperature 0 --compile --draft_steps 4
    python sample.py --start "FILE:prompt.txt" --exit_criterion confident-run --warm_start
    python sample.py --prompts prompts.txt --r 32                                       # one prompt per line, one batch
    python sample.py --init_from=huginn-0125 --chat --start "What is 17 * 24?" --r 32   # the released 3.5B model

--r sets the steps of the core per token (more test-time compute); it defaults to the model's r_bar. Decoding
uses decode.py: a KV cache with an entry per (step, core layer), early exit, self-speculation, compilation.
"""

import sys
import time

import torch

from checkpoints import (get_tokenizer, load_checkpoint, load_released, quantize_checkpoint, released_config,
                         trained_init_scale)
from common import chat_text, pick_device, pick_dtype, read_prompt, read_text, set_threads
from configurator import configure, decoding_fits, decoding_settings, fail, number, one_of, whole
from decode import EXIT_THRESHOLDS, generate, pad_prompts
from model import RecurrentGPT

# -----------------------------------------------------------------------------------------------------------
init_from = "resume"  # "resume": out_dir/ckpt.pt; "huginn-0125" or a folder in its layout: the released model
out_dir = "out"
chat = False  # released model: --start is a user turn in its chat format, answered by "Huginn"
start = "\n"  # the prompt, or "FILE:path" to read it from a file
prompts = ""  # a file with one prompt per line: all decoded together, in one batch (instead of --start)
num_samples = 3
max_new_tokens = 500
r = None  # steps of the core per token; None: the model's mean_recurrence r_bar
temperature = 0.8  # 0: greedy; below 1 sharper, above 1 more random
top_k = 200  # sample only from the k most likely tokens (0: all)
seed = 1337
exit_criterion = "none"  # "kl", "latent-diff", "confident-run" or "gate": a token stops early once it is done
exit_threshold = None  # None: the criterion's own (kl 1e-3, latent-diff 0.03: stop below; confident-run 10 steps;
                       # gate 0.003: stop once its probability that the step is settled is >= 1 - that)
cache_budget = None  # keep only this many core entries, a multiple of n_layers_core (None: every step's)
warm_start = False  # start each token's state at the previous token's final state instead of noise
init_scale = None  # std of the noise start s_0 (0: the zero state); None: what the model trained with
draft_steps = 0  # > 0: self-speculative greedy decoding, drafting at this r and checking at --r
lookahead = 4  # tokens drafted per check
compile = None  # compile the one-token step (minutes of compiling, then several times faster); None: on CUDA
quantize = ""  # "int8": int8 weights, a quarter of float32's bytes (linear_kernels.py), made from float ones at load
calibration_tokens = 8192  # int8, a checkpoint: GPTQ fits them on this many training tokens (0, or a release: nearest)
data_dir = ""  # the data GPTQ calibrates on; "" means the data the checkpoint was trained on
device = ""  # "" picks cuda > mps > cpu; or "cpu", "cuda", "cuda:1", "mps"
dtype = ""  # "" means bfloat16 on CUDA (if supported), float32 elsewhere; or float32, bfloat16, float16
num_threads = 0  # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores (a busy core then slows, not stalls)
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

# every setting checked before the model is loaded (the released one takes minutes)
whole(config, 1, "num_samples", "max_new_tokens", "lookahead")
whole(config, 0, "top_k", "draft_steps", "seed", "calibration_tokens")
number(config, "temperature", low=0)
if init_scale is not None:
    number(config, "init_scale", low=0)
decoding_settings(config, EXIT_THRESHOLDS)
if r is not None:
    whole(config, 1, "r")
if compile not in (None, True, False):
    fail(f"--compile must be True or False, got {compile!r}")
one_of(config, "quantize", ("", "int8"))
if quantize and compile:
    fail("--quantize int8 runs eagerly: drop --compile")
if draft_steps and (temperature != 0 or exit_criterion != "none" or warm_start):
    fail("--draft_steps (speculative decoding) is greedy: add --temperature 0; no --exit_criterion or --warm_start")
if prompts and start != "\n":
    fail("--start and --prompts both give the prompt: one prompt with --start, or a file of them with --prompts")
start = read_prompt(start)
# the prompts: --start, or each line of --prompts, decoded together in one batch
lines = read_text(prompts, "--prompts").split("\n") if prompts else []
texts = [line.rstrip("\r") for line in lines if line.strip()] if prompts else [start]  # (Windows line ends too)
if not texts:
    fail(f"--prompts={prompts} holds no prompt; give one per line")
device = pick_device(device)
device_type = device.split(":")[0]
dtype = pick_dtype(dtype, device)
set_threads(num_threads)
compile = device_type == "cuda" and not quantize if compile is None else compile
torch.manual_seed(seed)
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)

# the model and its tokenizer; a release's config.json first, so that what it cannot run stops before its weights
# are read (minutes) or downloaded
if init_from == "resume":
    model, checkpoint = load_checkpoint(out_dir, device)
    meta, shape, has_gate = checkpoint["meta"], model.config, hasattr(model, "exit_gate")
    if "examples" in meta:  # prepare_data.py reasoning / problems (a chat fine-tune's rows are text)
        fail(f"{out_dir} answers reasoning problems rather than continuing text: python eval.py --out_dir={out_dir}")
else:
    shape, has_gate = released_config(init_from), False
decoding_fits(shape, has_gate, config)
num_steps = shape.mean_recurrence if r is None else r
if draft_steps >= num_steps:
    fail(f"--draft_steps ({draft_steps}) must be below r ({num_steps}): the drafts are the cheap guesses r checks")
if draft_steps and lookahead + 1 > shape.block_size // 2:
    fail(f"--lookahead ({lookahead}) must be below half of block_size ({shape.block_size})")
if draft_steps and cache_budget is not None and cache_budget // shape.n_layers_core < num_steps:
    fail(f"--draft_steps (speculative decoding) needs every step's cache entries: drop --cache_budget or raise it to "
         f"r x n_layers_core = {num_steps * shape.n_layers_core}")
if init_from != "resume":  # the weights themselves in dtype (the authors evaluate in pure bfloat16), not autocast
    model, meta = load_released(init_from, device, ptdtype, quantize or None)
if init_scale is None:  # the noise the model trained with
    init_scale = trained_init_scale(checkpoint if init_from == "resume" else None, meta)
if chat and meta["tokenizer"] != "huginn":
    fail(f"--chat is for the released model and its fine-tunes: add --init_from=huginn-0125 (or a folder in its "
         f"layout); {out_dir} uses {meta['tokenizer']}")
encode, decode = get_tokenizer(meta)

# the prompts, as token ids
stop_ids = []
if meta["tokenizer"] == "huginn":  # the released model's text starts with <|begin_text|>; --chat adds a user turn
    if chat:  # the reference's chat template: the prompt is the user's turn, Huginn's opens after it
        texts = [chat_text([("user", text)]) for text in texts]
    texts = ["<|begin_text|>" + text for text in texts]
    stop_ids = [encode("<|end_text|>")[0], encode("<|end_turn|>")[0]]  # 65505, 65508: where a reply ends
start_ids = [encode(text) for text in texts]
if not all(start_ids):
    fail("a prompt is empty; give at least one token with --start (or on every line of --prompts)")
if max(map(len, start_ids)) > model.config.block_size:
    print(f"warning: a prompt has {max(map(len, start_ids))} tokens, more than block_size "
          f"{model.config.block_size}; keeping the last {model.config.block_size}", file=sys.stderr)
    start_ids = [ids[-model.config.block_size:] for ids in start_ids]
x, lengths = pad_prompts(start_ids)  # (B, T) padded on the left, and each prompt's length
x = x.to(device)
if draft_steps and len(set(lengths.tolist())) > 1:
    fail("--draft_steps (speculative decoding) takes prompts of one length; decode --prompts without it")
if quantize and init_from == "resume":  # once every setting and the prompts are known to fit (a release's: at load)
    quantize_checkpoint(model, checkpoint, calibration_tokens, data_dir)
with torch.device("meta"):  # the float model's count: an int8 model's weights are buffers, not parameters
    num_params = RecurrentGPT(model.config).get_num_params()
print(f"{init_from} {out_dir if init_from == 'resume' else ''}: {num_params / 1e6:.2f}M parameters, "
      f"r_bar {model.config.mean_recurrence}; decoding {len(texts)} prompt(s) at r = {num_steps}, temperature "
      f"{temperature}, top_k {top_k}, exit {exit_criterion}, cache_budget {cache_budget}, warm_start {warm_start}, "
      f"draft_steps {draft_steps}, compile {compile}, quantize {quantize or None}, init_scale {init_scale}")

# sampling
for k in range(num_samples):
    t0 = time.time()
    with autocast:
        y, stats = generate(model, x, max_new_tokens, num_steps=num_steps, temperature=temperature, top_k=top_k or None,
                            exit_criterion=exit_criterion, exit_threshold=exit_threshold, cache_budget=cache_budget,
                            warm_start=warm_start, init_scale=init_scale, stop_ids=stop_ids, compile=compile,
                            draft_steps=draft_steps, lookahead=lookahead, lengths=lengths)
    if device_type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.time() - t0
    made = int(stats["lengths"].sum())
    steps = stats["steps"].cpu()  # (B, new): a row's tokens up to its stop count, not the batch's after it
    steps = steps[torch.arange(steps.size(1)) < stats["lengths"].cpu()[:, None]]
    for b, ids in enumerate(start_ids):  # a reply ends at an end token, which is not printed
        new_ids = y[b, x.size(1):x.size(1) + int(stats["lengths"][b])].tolist()
        print(decode(ids + [t for t in new_ids if t not in stop_ids]))
    line = (f"--- sample {k + 1}: {made} tokens in {dt:.2f} s ({made / dt:.1f} tokens/s), "
            f"mean {steps.float().mean():.2f} steps per token (r = {num_steps})")
    if draft_steps:
        line += f", {stats['accepted']} of {stats['drafted']} drafts accepted"
    if compile and k == 0 and stats["first_step_seconds"] is not None:  # None: no step followed the prompt's pass
        line += f"; the prompt's pass and the first step took {stats['first_step_seconds']:.1f} s (compiling)"
    print(line)
