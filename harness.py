"""
Benchmarks by test-time r, with the standard harness (EleutherAI's lm-evaluation-harness): the paper's table is
lm-eval zero-shot accuracy at fixed r, and this prints the same table for our checkpoints and for Huginn-0125.

    pip install lm-eval                                     # the harness (optional; only this file needs it)
    python harness.py --tasks=arc_easy,hellaswag --r="[1,4,8,16,32]" --init_from=huginn-0125
    python harness.py --tasks=hellaswag,arc_easy --out_dir=out --r="[1,4,8,16]"          # the one-GPU model
    python harness.py --tasks=reasoning --include_path=data/reasoning/harness --out_dir=out-reasoning --r="[1,8,32]"

The harness is run once per r on the same loaded model; the table (tasks x r, each task's first metric) is printed
and written as JSON {task: {r: {metric: value}}} to out_dir/harness.json (or --output). The model is also
registered as "nanohuginn" for lm-eval's own command line:
    lm_eval --model nanohuginn --model_args out_dir=out,num_steps=8 --tasks hellaswag   (after `import harness`)
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from checkpoints import get_tokenizer, load_checkpoint, load_released
from common import keyed_generator, pick_device, pick_dtype, set_threads, writable_dir
from configurator import configure, fail, number, one_of, steps, whole
from decode import EXIT_THRESHOLDS, generate, pad_prompts
from kernels import quantize_int8

try:  # the harness is optional: only this file needs it
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
except ImportError:
    if __name__ == "__main__":
        sys.exit("error: harness.py needs lm-eval: pip install lm-eval")
    raise


@register_model("nanohuginn")
class NanoHuginn(TemplateLM):
    """A nanoHuginn model for lm-eval: our checkpoint (out_dir) or the release (init_from=huginn-0125 or a folder).
    loglikelihood: one full forward pass at r per batch of requests, padded on the right (a causal model never
    reads what follows). generate_until: decode.generate's batch of prompts of different lengths. Each request's
    noise start s_0 is keyed by its own tokens, so a request scores the same in any batch."""

    def __init__(self, out_dir="", init_from="", num_steps=None, exit_criterion="none", exit_threshold=None,
                 cache_budget=None, batch_size=16, device="", dtype="", quantize="", init_scale=1.0, seed=1337,
                 max_gen_toks=256):
        super().__init__()
        self.device_name = pick_device(device)
        if init_from:  # the weights in dtype (the authors evaluate in pure bfloat16 on GPUs)
            precision = getattr(torch, pick_dtype(dtype, self.device_name))
            self.model, meta = load_released(init_from, self.device_name, precision, quantize or None)
        else:
            self.model, checkpoint = load_checkpoint(out_dir or "out", self.device_name)
            meta = checkpoint["meta"]
            if quantize:
                quantize_int8(self.model)
        self.encode, self.decode = get_tokenizer(meta)
        # the token that stands before a text with no context: end of text (BPE), a newline (characters)
        self.prefix_id = {"r50k_base": 50256, "huginn": 65504}.get(meta["tokenizer"]) or self.encode("\n")[0]
        self.stop_ids = {"r50k_base": [50256], "huginn": [65505, 65508]}.get(meta["tokenizer"], [])
        self.num_steps = int(num_steps or self.model.config.mean_recurrence)
        self.exit_criterion, self.exit_threshold, self.cache_budget = exit_criterion, exit_threshold, cache_budget
        self.batch_size, self.init_scale, self.seed, self.max_gen_toks = int(batch_size), init_scale, seed, max_gen_toks

    # --- what lm-eval asks of a model ----------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.prefix_id

    @property
    def prefix_token_id(self):
        return self.prefix_id

    def tok_encode(self, string, **kwargs):
        return self.encode(string)

    def noise(self, tokens):
        """s_0 for one request (1, len, h), keyed by its tokens: the same whatever else is in the batch."""
        h = self.model.config.n_embd
        g = keyed_generator(self.seed, *tokens[:64], len(tokens), device=self.device_name)
        return self.model.initial_state(torch.empty(1, len(tokens), h, device=self.device_name,
                                                    dtype=self.model.ln_f.weight.dtype), self.init_scale, g)

    @torch.no_grad()
    def token_log_probs(self, sequences):
        """log p(token t | tokens < t) for every sequence (lists of ids, at most block_size), one forward pass at
        r for all of them: a list of tensors (len - 1,)."""
        T = max(map(len, sequences))
        idx = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=self.device_name)
        state = torch.cat([F.pad(self.noise(s), (0, 0, 0, T - len(s))) for s in sequences])  # padded on the right
        logits, _ = self.model(idx, num_steps=self.num_steps, state=state)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return [log_probs[b, :len(s) - 1].gather(-1, idx[b, 1:len(s), None])[:, 0].cpu()
                for b, s in enumerate(sequences)]

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids) -> (sum of log p, greedy?)"""
        block = self.model.config.block_size
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            sequences = [(context + continuation)[-block - 1:][:block] for _, context, continuation in batch]
            for (key, context, continuation), s, lp in zip(batch, sequences, self.token_log_probs(
                    [(c + k)[-block:] for _, c, k in batch])):
                n = len(continuation)
                full = (context + continuation)[-block:]
                ours = lp[-n:]
                greedy = True  # filled below from the argmax
                results.append((float(ours.sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError
