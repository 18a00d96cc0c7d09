"""
Benchmarks by test-time r with the standard harness, EleutherAI's lm-evaluation-harness: the paper's table is
lm-eval zero-shot accuracy at fixed r, and this prints the same table, for our checkpoints and for Huginn-0125.

    pip install lm-eval                                          # the harness: optional, only this file needs it
    python harness.py --tasks=arc_easy,hellaswag --r="[1,4,8,16,32]" --init_from=huginn-0125
    python harness.py --tasks=hellaswag,arc_easy --out_dir=out --r="[1,4,8,16]"              # the one-GPU model
    python harness.py --tasks=reasoning,reasoning_choice --include_path=data/reasoning/harness \\
        --out_dir=out-reasoning --r="[1,8,32]"                  # local tasks prepare_data.py wrote (no download)

The model is loaded once and the harness run once per r. The table (tasks x r, each task's main metric) is printed
and written as JSON {"settings": ..., "table": {task: {r: {metric: value}}}} to out_dir/harness.json (beside it:
harness_int8.json with int8 weights, harness_limit100.json for --limit=100; or --output). NanoHuginn, the model class,
is registered with lm-eval as "nanohuginn" for use from Python (lm_eval.simple_evaluate).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from checkpoints import (get_tokenizer, load_checkpoint, load_released, quantize_checkpoint, read_checkpoint,
                         released_config, trained_init_scale)
from common import chat_text, keyed_generator, pick_device, pick_dtype, read_text, set_threads, writable_dir
from configurator import configure, decoding_fits, decoding_settings, fail, number, one_of, steps, whole
from decode import EXIT_THRESHOLDS, generate, pad_prompts

try:  # the harness is optional: only this file needs it
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    sys.exit("error: harness.py needs the evaluation harness: pip install lm-eval")

SPECIAL = {"r50k_base": dict(prefix=50256, stop=[50256]), "huginn": dict(prefix=65504, stop=[65505, 65508])}


@register_model("nanohuginn")
class NanoHuginn(TemplateLM):
    """A nanoHuginn model for lm-eval: our checkpoint (out_dir) or the release (init_from=huginn-0125 or a folder),
    run at num_steps (r). loglikelihood: one forward pass at r per batch of requests, padded on the right (a causal
    model never reads what follows a position). generate_until: decode.generate's batch of prompts of different
    lengths, with its exits and cache budget. A request's noise start s_0 does not depend on its batch: keyed by
    its own tokens (loglikelihood), or one table every batch reads at its rows' own positions (generation; a greedy
    answer is the same in any batch until the batch's context fills block_size: its rows are cropped together)."""

    def __init__(self, out_dir="out", init_from="resume", num_steps=None, exit_criterion="none", exit_threshold=None,
                 cache_budget=None, batch_size=16, device="", dtype="", quantize="", init_scale=None, seed=1337,
                 calibration_tokens=8192, data_dir=""):
        super().__init__()
        self.device_name = pick_device(device)
        if init_from != "resume":  # the release, its weights in dtype (bfloat16 on GPUs, as the authors evaluate)
            precision = getattr(torch, pick_dtype(dtype, self.device_name))
            self.model, meta = load_released(init_from, self.device_name, precision, quantize or None)
        else:
            self.model, checkpoint = load_checkpoint(out_dir, self.device_name)
            meta = checkpoint["meta"]
            # what the exits and cache budget ask of it, before int8's calibration (a release's: its config.json)
            decoding_fits(self.model.config, hasattr(self.model, "exit_gate"),
                          dict(exit_criterion=exit_criterion, cache_budget=cache_budget, out_dir=out_dir))
            if quantize:
                quantize_checkpoint(self.model, checkpoint, int(calibration_tokens), data_dir)
        if init_scale is None:  # the noise the model trained with
            init_scale = trained_init_scale(checkpoint if init_from == "resume" else None, meta)
        self.tokenizer_kind = meta["tokenizer"]
        self.encode, self.decode = get_tokenizer(meta)
        # what stands before a text with no context, and where a generation ends: end of text (BPE; the release's
        # begin and end tokens), a newline (characters)
        special = SPECIAL.get(self.tokenizer_kind, dict(prefix=self.encode("\n")[0], stop=[]))
        self.prefix_id, self.stop_ids = special["prefix"], special["stop"]
        self.num_steps = int(num_steps or self.model.config.mean_recurrence)
        self.exit_criterion, self.exit_threshold, self.cache_budget = exit_criterion, exit_threshold, cache_budget
        self.batch_size, self.init_scale, self.seed = int(batch_size), float(init_scale), int(seed)

    # --- tokens ----------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.prefix_id

    @property
    def tokenizer_name(self):
        return self.tokenizer_kind

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        # the release's texts begin with <|begin_text|>, as sample.py's do
        begin = [self.prefix_id] if self.tokenizer_kind == "huginn" and add_special_tokens is not False else []
        return begin + self.encode(string)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The release's chat template (the reference's): a header per turn, each turn closed by <|end_turn|>, the
        assistant named Huginn."""
        return chat_text([(m["role"], m["content"]) for m in chat_history], add_generation_prompt)

    # --- scoring ---------------------------------------------------------------------------------------------

    def noise(self, tokens):
        """s_0 for one sequence (1, T, h), keyed by its tokens: the same whatever else is in the batch."""
        generator = keyed_generator(self.seed, *tokens, device=self.device_name)
        return self.model.initial_state((1, len(tokens), self.model.config.n_embd), self.init_scale, generator)

    @torch.no_grad()
    def score(self, inputs, targets):
        """For each pair (input ids, target ids), the last len(target) positions of the input predict the target:
        (sum of their log-probabilities, whether each is the argmax). One forward pass at r for all pairs."""
        T = max(map(len, inputs))
        idx = torch.tensor([x + [0] * (T - len(x)) for x in inputs], device=self.device_name)  # padded on the right
        state = torch.cat([F.pad(self.noise(x), (0, 0, 0, T - len(x))) for x in inputs])
        logits, _ = self.model(idx, num_steps=self.num_steps, state=state)
        results = []
        for b, (x, y) in enumerate(zip(inputs, targets)):
            log_probs = F.log_softmax(logits[b, len(x) - len(y):len(x)].float(), dim=-1)  # (len(y), vocab)
            y = torch.tensor(y, device=log_probs.device)
            results.append((float(log_probs.gather(-1, y[:, None]).sum()), bool((log_probs.argmax(-1) == y).all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids) -> (log p(continuation), greedy?)"""
        block, pairs = self.model.config.block_size, []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(block + 1):]  # the model reads all but the last token
            if len(continuation) >= len(whole):
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit block_size {block}")
            pairs.append((whole[:-1], continuation))
        results = []
        for start in range(0, len(pairs), self.batch_size):
            results += self.score(*zip(*pairs[start:start + self.batch_size]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """log p(text) of whole texts (perplexity tasks): windows of block_size, each scored with the context the
        window before it leaves."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_id, self.model.config.block_size, 1)]
            totals.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, y) for c, y in windows])))
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled, if the task asks) continuations of contexts, cut at the first stop string. lm-eval
        sends every task's requests in one call: a batch holds requests with the same settings, in their order."""
        groups = {}  # request indices by their settings (stop strings, length, sampling)
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        batches = [ids[start:start + self.batch_size] for ids in groups.values()
                   for start in range(0, len(ids), self.batch_size)]
        outputs = [None] * len(requests)
        for ids in batches:
            batch = [requests[i].args for i in ids]
            kwargs = batch[0][1]
            max_new = int(kwargs.get("max_gen_toks", 256))
            until = [kwargs["until"]] if isinstance(kwargs.get("until"), str) else list(kwargs.get("until", []))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            # the last block_size tokens of each context (generate crops the context itself as it grows). Every
            # batch draws the same noise table, read by each row at its own positions: a greedy request decodes
            # alike in any batch until the batch's longest row fills block_size (then its rows are cropped together)
            block = self.model.config.block_size
            idx, lengths = pad_prompts([self.tok_encode(context)[-block:] for context, _ in batch])
            out, stats = generate(self.model, idx.to(self.device_name), max_new, self.num_steps,
                                  temperature=temperature, exit_criterion=self.exit_criterion,
                                  exit_threshold=self.exit_threshold, cache_budget=self.cache_budget,
                                  init_scale=self.init_scale, stop_ids=self.stop_ids, lengths=lengths,
                                  generator=keyed_generator(self.seed, device=self.device_name))
            for b, i in enumerate(ids):
                new = out[b, idx.size(1):idx.size(1) + int(stats["lengths"][b])].tolist()
                text = self.decode([t for t in new if t not in self.stop_ids])
                for stop in until:  # the text up to the first stop string
                    text = text.split(stop)[0] if stop else text
                outputs[i] = text
        return outputs


# -----------------------------------------------------------------------------------------------------------
# the table by r

def check_settings(config):
    """Every setting, the tasks and the output folder, before the model loads and the tasks download."""
    steps(config, "r")
    whole(config, 0, "limit", "seed", "num_threads", "calibration_tokens")
    whole(config, 1, "batch_size")
    whole(config, -1, "num_fewshot")
    if config["init_scale"] is not None:
        number(config, "init_scale", low=0)
    one_of(config, "quantize", ("", "int8"))
    decoding_settings(config, EXIT_THRESHOLDS)
    names = [t for t in config["tasks"].split(",") if t]
    if not names:
        fail("give the tasks to run with --tasks, e.g. --tasks=arc_easy,hellaswag (lm-eval's names)")
    if config["include_path"] and not os.path.isdir(config["include_path"]):
        fail(f"--include_path={config['include_path']} is not a folder of task YAMLs")
    for name in sorted(os.listdir(config["include_path"])) if config["include_path"] else []:
        path = os.path.join(config["include_path"], name)
        text = read_text(path, "--include_path") if name.endswith(".yaml") and os.path.isfile(path) else ""
        task = json.loads(text) if text.startswith("{") else {}  # prepare_data.py's tasks (JSON is YAML) name
        for data in task.get("dataset_kwargs", {}).get("data_files", {}).values():  # their data by absolute path
            if not os.path.isfile(data):
                fail(f"{path} reads {data}, which is not there (its data folder moved?); run prepare_data.py again")
    checkpoint, resume = os.path.join(config["out_dir"], "ckpt.pt"), config["init_from"] == "resume"
    if resume and not os.path.isfile(checkpoint):  # before lm-eval indexes its tasks
        fail(f"no checkpoint at {checkpoint}; train one first (python train.py ...) or point --out_dir at one")
    if resume and config["dtype"]:
        fail("--dtype is the released model's (its weights in that dtype); a checkpoint runs in float32: drop it")
    chat = config["apply_chat_template"] or config["system_instruction"]
    # a checkpoint's tokenizer (memory-mapped: no weight is read), or the release's
    tokenizer = read_checkpoint(checkpoint, mmap=True)["meta"]["tokenizer"] if chat and resume else "huginn"
    if tokenizer != "huginn":  # the template's strings would be plain text in other tokens
        fail(f"--apply_chat_template and --system_instruction are the release's chat format; {config['out_dir']} "
             f"reads {tokenizer} tokens, which have no chat tokens: drop them")
    if not resume:  # a release's exits and cache budget against its config.json, before its weights
        decoding_fits(released_config(config["init_from"]), False, config)
    # a table of int8 weights, or of --limit examples, beside the full float one, not over it
    quantized = f"_{config['quantize']}" if config["quantize"] else ""
    limited = f"_limit{config['limit']}" if config["limit"] else ""
    path = config["output"] or os.path.join(config["out_dir"], f"harness{quantized}{limited}.json")
    if not path.endswith(".json") or os.path.isdir(path):  # never over a checkpoint, nor a folder after the run
        fail(f"--output={path}: give the name of a .json file for the table by r")
    writable_dir(os.path.dirname(os.path.abspath(path)), "--output")
    task_manager = TaskManager(include_path=config["include_path"] or None)
    unknown = [t for t in names if t not in task_manager.all_tasks]
    if unknown:
        fail(f"unknown task(s) {', '.join(unknown)}; lm-eval lists its own with: lm_eval ls tasks")
    return names, task_manager, path


def metrics_of(results):
    """{task: {metric: value}} of one lm-eval run: every task it ran (a tag or a group names several) and every group
    it scored. A metric lm-eval reports under one filter keeps its name ("acc"), one under several is named with
    each ("exact_match,strict-match" and "exact_match,flexible-extract": GSM8K's, the paper's two figures)."""
    metrics = {}
    for task, values in results["results"].items():
        keys = [k for k, v in values.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        names = [k.split(",")[0] for k in keys]
        if keys:  # a group without an aggregate metric has none
            metrics[task] = {(name if names.count(name) == 1 else k): values[k] for name, k in zip(names, keys)}
    return metrics


def shown_metrics(metrics):
    """The metrics a task's row of the table shows: the first of acc_norm, acc, exact_match it reports (under each
    of its filters), else all of them."""
    for name in ("acc_norm", "acc", "exact_match"):
        if any(m.split(",")[0] == name for m in metrics):
            return [m for m in metrics if m.split(",")[0] == name]
    return sorted(metrics)


def table_by_r(lm, names, task_manager, rs, config):
    """Run the harness once per r on the loaded model: {task: {r: {metric: value}}}."""
    table = {}
    for num_steps in rs:
        lm.num_steps = num_steps
        results = simple_evaluate(model=lm, tasks=names, task_manager=task_manager, limit=config["limit"] or None,
                                  num_fewshot=None if config["num_fewshot"] < 0 else config["num_fewshot"],
                                  apply_chat_template=config["apply_chat_template"], log_samples=False,
                                  system_instruction=config["system_instruction"] or None, bootstrap_iters=0)
        for task, metrics in metrics_of(results).items():
            table.setdefault(task, {})[str(num_steps)] = metrics
        print(f"r = {num_steps}: " + ", ".join(f"{t} {table[t][str(num_steps)]}" for t in table), flush=True)
    return table


# settings (python harness.py --key=value)
tasks = ""            # comma-separated lm-eval task names, e.g. arc_easy,hellaswag
r = []                # test-time r (steps of the core); [] means the model's r_bar
init_from = "resume"  # "resume": out_dir/ckpt.pt; "huginn-0125" or a folder in its layout: the released model
out_dir = "out"
include_path = ""     # a folder of task YAMLs of your own (prepare_data.py reasoning writes one)
limit = 0             # at most this many examples per task (0: all)
num_fewshot = -1      # examples in each prompt; -1: each task's own default
batch_size = 16
exit_criterion = "none"  # the exits of generate_until (loglikelihood always runs every step)
exit_threshold = None
cache_budget = None
init_scale = None     # std of the noise start s_0 (0: the zero state); None: what the model trained with
quantize = ""         # "int8": int8 weights (linear_kernels.py)
calibration_tokens = 8192  # int8, a checkpoint: GPTQ fits them on this many training tokens (0, or a release: nearest)
data_dir = ""         # the data GPTQ calibrates on; "" means the data the checkpoint was trained on
apply_chat_template = False  # the release's chat template around each prompt (the paper's GSM8K setting) ...
system_instruction = ""     # ... with this system turn
output = ""           # where the JSON goes (a .json file); "" means out_dir/harness.json
device = ""
dtype = ""
num_threads = 0
seed = 1337

if __name__ == "__main__":
    config = configure(globals())
    names, task_manager, output_path = check_settings(config)
    set_threads(num_threads)
    lm = NanoHuginn(out_dir, init_from, None, exit_criterion, exit_threshold, cache_budget, batch_size, device,
                    dtype, quantize, init_scale, seed, calibration_tokens, data_dir)
    rs = r or [lm.model.config.mean_recurrence]
    table = table_by_r(lm, names, task_manager, rs, config)
    rows = [(task, metric) for task in table for metric in shown_metrics(table[task][str(rs[0])])]
    width = max([12] + [len(metric) for _, metric in rows])
    print(f"\n{init_from if init_from != 'resume' else out_dir}: {limit or 'all'} examples per task")
    print(f"{'task':<24} {'metric':<{width}} " + " ".join(f"{'r=' + str(n):>8}" for n in rs))
    for task, metric in rows:
        print(f"{task:<24} {metric:<{width}} " + " ".join(f"{table[task][str(n)][metric]:8.4f}" for n in rs))
    with open(output_path, "w") as f:  # the table, and what it was measured with
        json.dump({"settings": config, "table": table}, f, indent=1)
    print(f"wrote {output_path}")
