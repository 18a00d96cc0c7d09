"""
Decoding with the recurrent-depth model of model.py: a KV cache with an entry per (step, core layer), per-token
early exit, a compiled one-token step and self-speculative decoding.

    from decode import generate
    idx, stats = generate(model, idx, 200, num_steps=32, temperature=0.8)               # r = 32 steps per token
    idx, stats = generate(model, idx, 200, num_steps=32, exit_criterion="kl")           # each token stops early
    idx, stats = generate(model, idx, 200, num_steps=32, temperature=0, compile=True, draft_steps=4)  # fast greedy

Every new token runs the core r times, so whatever one layer call wastes is paid r times per token: the cache has a
fixed shape (the write position is a tensor, writes are in place), so the one-token step compiles once for every r,
position and exit point. docs/decoding.md compares them with the reference's inference features.
"""

import math
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from linear_kernels import Int8Linear, compile_for_decoding, decoding_context, quantize_int8


class KVCache:
    """Keys and values of every attention layer for the tokens at buffer indices 0 .. pos-1, in buffers of a fixed
    length max_len, for a batch of B rows. A row may start later than index 0 (its prompt was shorter: left
    padding); `first` (B,) is the index of each row's first token, its position 0 for RoPE.

    Prelude and coda layers run once per token: one buffer each. The core runs r times and step i of a new token
    attends to the earlier tokens' keys of step i, so each core layer keeps one buffer per step (the reference's
    HuginnDynamicCache). A cache_budget of N entries keeps N / n_layers_core steps per core layer, step i in buffer
    i mod that (the reference's compress-sN; N = n_layers_core: the memory of a plain transformer of the width)."""

    def __init__(self, model, batch_size, max_len, num_steps, cache_budget=None, first=None):
        cfg = model.config
        self.steps_kept = num_steps if cache_budget is None else cache_budget // cfg.n_layers_core
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)  # (B, nh, max_len, hd)
        # the dtype attention computes in: autocast's, or the weights'
        device = model.rope.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
            model.ln_f.weight.dtype
        zeros = lambda *steps: torch.zeros(*steps, *shape, dtype=dtype, device=device)
        self.prelude_kv = [(zeros(), zeros()) for _ in range(cfg.n_layers_prelude)]
        self.core_kv = [(zeros(self.steps_kept), zeros(self.steps_kept)) for _ in range(cfg.n_layers_core)]
        self.coda_kv = [(zeros(), zeros()) for _ in range(cfg.n_layers_coda)]
        self.max_len, self.rope = max_len, model.rope
        self.keys = torch.arange(max_len, device=device)  # the buffer's indices
        self.set_first(torch.zeros(batch_size, dtype=torch.long) if first is None else first)
        self.pos = 0  # indices 0 .. pos-1 are cached; the next forward_cached writes from here
        self.index = self.mask = None  # set by start(): where the current tokens go, what each may attend to

    def set_first(self, first):
        """Each row's first index (B,), and from it, once rather than at every token, each index's position in its row
        (B, max_len), its RoPE rows (B, max_len, hd/2, 2) and what it may attend to (B, 1, max_len, max_len): its own
        row's tokens up to itself, from the row's first on. A padding slot (position 0) sees only itself (never nothing:
        an empty softmax would be nan). These are small beside the cache: max_len bytes a position against its keys."""
        self.first = first.to(self.keys.device)
        keys, new = self.keys, self.keys[:, None]
        self.positions = (keys[None] - self.first[:, None]).clamp(min=0)  # (B, max_len)
        self.rope_rows = self.rope[self.positions]
        self.visible = ((keys <= new) & (keys >= self.first[:, None, None]) | (keys == new))[:, None]

    def start(self, T):
        """Begin writing T new tokens at indices pos .. pos+T-1: their rows of the RoPE table (B, T, hd/2, 2), each
        row at its own positions, and the mask every attention layer applies (B, 1, T, max_len)."""
        self.index = torch.arange(self.pos, self.pos + T, device=self.keys.device)  # (T,), its own storage
        self.mask = self.visible[:, :, self.pos:self.pos + T]
        return self.rope_rows[:, self.pos:self.pos + T]

    def advance(self, T):
        """The T tokens of start() are in: the next ones go after them."""
        self.pos += T

    def rollback(self, pos):
        """Forget every index from pos on (speculative decoding's rejected drafts, a new prefill): they are written
        again before anything reads them."""
        self.pos = pos

    # what each layer's attention gets: its buffers, where to write and what it may read (CausalSelfAttention)
    def prelude(self):
        return [(k, v, self.index, self.mask) for k, v in self.prelude_kv]

    def core(self, step):
        kept = step % self.steps_kept
        return [(k[kept], v[kept], self.index, self.mask) for k, v in self.core_kv]

    def coda(self):
        return [(k, v, self.index, self.mask) for k, v in self.coda_kv]

    def exit_entries(self, row, steps_run):
        """The core's keys and values of the new tokens of one row at its exit step, copied: while other rows of
        the batch go on, its buffers are written again, and under a cache budget the exit step's own is reused."""
        new, last = slice(self.pos, self.pos + len(self.index)), (steps_run - 1) % self.steps_kept
        return [(k[last, row, :, new].clone(), v[last, row, :, new].clone()) for k, v in self.core_kv]

    def fill_after_exit(self, row, steps_run, num_steps, entries):
        """A token that stopped after steps_run < r steps has no keys for the steps it skipped. Later tokens read its
        last step's keys and values there, of the same core layer (the reference's "latest-m4"): `entries`, from
        exit_entries, go to the buffers of the exit step and of every step skipped."""
        slots = sorted({step % self.steps_kept for step in range(steps_run - 1, num_steps)})
        new = slice(self.pos, self.pos + len(self.index))
        for (k, v), (k_exit, v_exit) in zip(self.core_kv, entries):  # (steps_kept, B, nh, max_len, hd) each
            k[slots, row, :, new], v[slots, row, :, new] = k_exit, v_exit


# ----------------------------------------------------------------------------------------------------------------
# Exit rules: when is a token done? (adaptive compute per token; zero-shot but for the gate: it never learned to stop)


CONFIDENT = 0.9  # confident-run: a prediction is confident at this top probability


def step_kl(previous, log_probs):
    """KL(p_{i-1} || p_i) per row from log-probabilities (B, vocab); previous None: p_0 is uniform."""
    if previous is None:
        previous = torch.full_like(log_probs, -math.log(log_probs.size(-1)))
    return (previous.exp() * (previous - log_probs)).sum(-1)


def state_change(previous, state):
    """||s_i - s_{i-1}|| / ||s_i|| per row (B, h) -> (B,)."""
    return (state - previous).norm(dim=-1) / state.norm(dim=-1)


class ExitRule:
    """One interface for every exit rule. At a new token, start(state) with its s_0 (B, h); after each step of the
    core, done(step, state, log_probs) -> (B,) bool, the rows that may stop now, from the step's state s_i (B, h)
    and, for rules that need it (needs_prediction), the log-probabilities of its next-token prediction (B, vocab).
    Rows are independent, so a rule serves a batch of tokens in decoding and every position of a split at once
    (latents.py, exits.py)."""
    needs_prediction = False

    def __init__(self, threshold):
        self.threshold = threshold

    def start(self, state):
        pass

    def done(self, step, state, log_probs):
        raise NotImplementedError


class KL(ExitRule):
    """KL(p_{i-1} || p_i) below the threshold, p_0 uniform (the reference's "kl")."""
    needs_prediction = True

    def start(self, state):
        self.previous = None

    def done(self, step, state, log_probs):
        kl = step_kl(self.previous, log_probs)
        self.previous = log_probs
        # KL >= 0: the clamp stops rounding from making it negative, so a threshold of 0 never exits
        return kl.clamp(min=0) < self.threshold


class LatentDiff(ExitRule):
    """||s_i - s_{i-1}|| / ||s_i|| below the threshold (the reference's "latent-diff")."""

    def start(self, state):
        self.previous = state

    def done(self, step, state, log_probs):
        change = state_change(self.previous, state)
        self.previous = state
        return change < self.threshold


class ConfidentRun(ExitRule):
    """One argmax at top probability >= CONFIDENT for `threshold` steps in a row (latents.py's think-meter found
    that a settled answer looks like this)."""
    needs_prediction = True

    def start(self, state):
        self.argmax, self.run = None, 0

    def done(self, step, state, log_probs):
        top, argmax = log_probs.max(-1)
        confident = top.exp() >= CONFIDENT
        held = confident & (argmax == self.argmax) if self.argmax is not None else torch.zeros_like(confident)
        self.run = torch.where(held, self.run + 1, confident.long())
        self.argmax = argmax
        return self.run >= self.threshold


class Signals:
    """What the learned gate reads after each step, per row: how much the prediction and the state still change
    (log10 of kl and latent-diff), how sure the prediction is (top probability, entropy), the same over the
    HISTORY steps before, how long the argmax and a confident argmax have held, and log(step): 19 features.
    Below 1e-6 and 1e-5, kl and latent-diff are float32 rounding, which differs between a cached and a full pass:
    they are floored there, or a gate would learn from noise."""
    HISTORY = 3

    def start(self, state):
        self.state, self.log_probs, self.argmax, self.history = state, None, None, None

    def features(self, step, state, log_probs):
        state, log_probs = state.float(), log_probs.float()
        kl = step_kl(self.log_probs, log_probs).clamp(min=1e-6)
        latent_diff = state_change(self.state, state).clamp(min=1e-5)
        top, argmax = log_probs.max(-1)
        entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1)
        now = torch.stack([kl.log10(), latent_diff.log10(), top.exp(), entropy], dim=-1)  # (B, 4)
        if self.history is None:  # step 1 has no past: its own values stand in
            self.unchanged = self.confident_run = torch.zeros_like(top)
            self.history = now[:, None].repeat(1, self.HISTORY, 1)  # (B, HISTORY, 4), newest first
        same = argmax == self.argmax if self.argmax is not None else torch.zeros_like(argmax, dtype=torch.bool)
        self.unchanged = torch.where(same, self.unchanged + 1, 0)
        confident = top.exp() >= CONFIDENT
        self.confident_run = torch.where(confident, torch.where(same, self.confident_run, 0) + 1, 0)
        held = torch.stack([self.unchanged, self.confident_run], dim=-1).clamp(max=16) / 8
        features = torch.cat([now, self.history.flatten(1), held, torch.full_like(top, math.log(step))[:, None]], -1)
        self.history = torch.cat([now[:, None], self.history[:, :-1]], dim=1)
        self.state, self.log_probs, self.argmax = state, log_probs, argmax
        return features  # (B, 19)


class Gate(ExitRule):
    """A learned exit: a tiny MLP on Signals' features gives the probability that the step is settled (its prediction
    the one it keeps to r, its state near its last); stop once that is at least 1 - threshold. exits.py fits it where
    it is used, by cached decoding, and saves it beside the checkpoint (exit_gate.pt), where load_checkpoint finds
    it. It runs in float32 under autocast too: in bfloat16, 1 - 0.003 is 0.996, which 0.994 passes."""
    needs_prediction = True

    def __init__(self, threshold, net, mean, std):
        super().__init__(threshold)
        self.net, self.mean, self.std = net, mean, std

    def start(self, state):
        self.signals = Signals()
        self.signals.start(state)
        if next(self.net.parameters()).device != state.device:  # read and fit on the CPU, used where the model runs
            self.net.to(state.device)

    def settled(self, features):
        full = torch.amp.is_autocast_available(features.device.type)  # float32 (the class docstring says why)
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False) if full else nullcontext():
            return torch.sigmoid(self.net((features - self.mean.to(features)) / self.std.to(features)))[..., 0]

    def done(self, step, state, log_probs):
        return self.settled(self.signals.features(step, state, log_probs)) >= 1 - self.threshold


def gate_net(hidden=32):
    return nn.Sequential(nn.Linear(19, hidden), nn.GELU(), nn.Linear(hidden, 1))


def load_gate(path):
    """exit_gate.pt (exits.py writes it beside a checkpoint) -> {"net", "mean", "std"}"""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = gate_net(saved["hidden"])
    net.load_state_dict(saved["state_dict"])
    return {"net": net.eval(), "mean": saved["mean"], "std": saved["std"], "fitted_on": saved.get("fitted_on")}


# the exit criteria by name and their default thresholds: the reference's automatic values for kl and latent-diff
# (stop below them), the steps in a row confident-run waits (10 held on every three-cups checkpoint measured), and
# 1 - the gate's probability of "settled" (the largest that met 0.99 in every group of moves on the held-out rows of
# four three-cups checkpoints; exits.py fits the gate with it too): docs/look_inside.md
EXIT_RULES = {"kl": KL, "latent-diff": LatentDiff, "confident-run": ConfidentRun, "gate": Gate}
EXIT_THRESHOLDS = {"none": 0.0, "kl": 1e-3, "latent-diff": 0.03, "confident-run": 10, "gate": 3e-3}


def exit_rule(model, criterion, threshold=None):
    """The ExitRule for a criterion's name (None for "none"); the gate is the one saved beside the checkpoint."""
    if criterion == "none":
        return None
    if criterion == "gate":
        gate = getattr(model, "exit_gate", None)
        if gate is None:
            raise ValueError("this model has no exit gate fit on it: python exits.py --out_dir=<its checkpoint>")
        return Gate(EXIT_THRESHOLDS["gate"] if threshold is None else threshold, gate["net"], gate["mean"], gate["std"])
    return EXIT_RULES[criterion](EXIT_THRESHOLDS[criterion] if threshold is None else threshold)


def forward_cached(model, idx, cache, num_steps, noise, state=None, rule=None, last=False, watch=None):
    """Run new tokens idx (B, T) at positions cache.pos .. through the model, reading and filling the cache.

    The same embed, iterate and predict as model.forward, so the logits equal a full forward pass over the context.
    noise (B, max_len, h) holds s_0 for every cache index; `state` replaces it (warm start). With an exit rule (an
    ExitRule; T = 1 only) each row stops at the first step the rule says it is done, and keeps that step's state.
    watch(step, state, log_probs), if given, sees every step's state (B, h) and prediction (B, vocab) of the last
    position; every row then runs all num_steps, but what a stopped row leaves (its state, its cache entries) is
    that of its exit step, so the tokens after it see decoding with the rule (exits.py learns from this).
    Returns the logits (B, T, vocab) (last=True: (B, 1, vocab), the last position's only), the final states
    (B, T, h) and the steps each row ran (B,)."""
    B, T = idx.shape
    state = noise[:, cache.pos:cache.pos + T] if state is None else state
    # copies with standard strides: a slice (of the noise, of a longer sequence) has others, new shapes to compile
    idx, state = idx.clone(memory_format=torch.contiguous_format), state.clone(memory_format=torch.contiguous_format)
    rope = cache.start(T)
    e = model.embed(idx, rope, cache.prelude())  # (B, T, h)
    steps = torch.full((B,), num_steps)
    running = torch.ones(B, dtype=torch.bool)
    exits = {}  # row -> the cache entries of its exit step, for the steps it skips
    if rule is not None:
        rule.start(state[:, -1])
    for step, new_state in enumerate(model.iterate(state, e, rope, num_steps, cache), start=1):
        if rule is None and watch is None:
            state = new_state
            continue
        log_probs = None  # the step's next-token prediction, for the rules that read it (and for watch)
        if watch is not None or rule.needs_prediction:
            log_probs = F.log_softmax(model.predict(new_state, rope, cache.coda())[:, -1].float(), dim=-1)  # (B, V)
        if watch is not None:
            watch(step, new_state[:, -1], log_probs)
        done = rule.done(step, new_state[:, -1], log_probs).cpu() if rule is not None else torch.zeros(B, dtype=bool)
        state = torch.where(running[:, None, None].to(state.device), new_state, state)  # stopped rows keep theirs
        stop = running & done
        steps[stop] = step
        running &= ~stop
        if step < num_steps:
            exits.update({row: cache.exit_entries(row, step) for row in stop.nonzero().flatten().tolist()})
        if not running.any() and watch is None:
            break
    for row, entries in exits.items():
        cache.fill_after_exit(row, int(steps[row]), num_steps, entries)
    logits = model.predict(state, rope, cache.coda(), last)  # each row from its own last state
    cache.advance(T)
    return logits, state, steps


def speculative_round(model, logits, cache, noise, num_steps, draft_steps, lookahead):
    """Self-speculative decoding (greedy): the next token is the argmax of logits (B, vocab), the model's own at the
    full r. From it the model drafts `lookahead` more tokens cheaply at draft_steps steps, then checks them all in
    one pass at the full num_steps and keeps the drafts it agrees with. Returns the new tokens (B, kept + 1), the
    full-r logits of the token after them (B, vocab) and `kept`; the output is exactly greedy decoding at num_steps.
    The cache holds every token before the new ones, and after the round every new one."""
    start = cache.pos
    token, drafts = logits.argmax(-1, keepdim=True), []  # (B, 1): certain, the full r chose it
    first = token
    for _ in range(lookahead):
        token = forward_cached(model, token, cache, draft_steps, noise)[0][:, -1:].argmax(-1)
        drafts.append(token)
    drafts = torch.cat(drafts, dim=1)  # (B, lookahead)
    cache.rollback(start)  # the check writes these positions again, at the full r
    check, _, _ = forward_cached(model, torch.cat([first, drafts], dim=1), cache, num_steps, noise)
    best = check.argmax(-1)  # (B, lookahead + 1): the greedy token at the full r after each position
    agree = (best[:, :-1] == drafts).long().cumprod(dim=1).sum(dim=1)  # leading drafts each row agrees with
    kept = int(agree.min())  # the same for every row, so the rows stay aligned
    cache.rollback(start + kept + 1)  # positions past the kept drafts get written again
    return torch.cat([first, drafts[:, :kept]], dim=1), check[:, kept], kept


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """One token id per row (B, 1) from next-token logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the best at 0: no tiny T overflows to inf
    if top_k:  # None or 0: every token (sample.py's --top_k=0)
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, num_steps=None, temperature=1.0, top_k=None, exit_criterion="none",
             exit_threshold=None, cache_budget=None, warm_start=False, init_scale=1.0, stop_ids=(), compile=False,
             quantize=None, draft_steps=0, lookahead=4, generator=None, lengths=None):
    """Continue the prompts idx (B, T) by up to max_new_tokens tokens at num_steps (r, default r_bar) steps each.

    Prompts of different lengths: left-padded to T with lengths (B,) (pad_prompts makes both); each row decodes as it
    would alone until the batch's context is full (block_size), when all rows go on from its last block_size / 2
    positions. exit_criterion: a token stops early by that rule (EXIT_RULES; EXIT_THRESHOLDS or exit_threshold).
    cache_budget=N keeps N core entries (a multiple of n_layers_core). warm_start: a token's state starts at the last
    one's final state (continuous_compute). compile: compile_for_decoding; quantize="int8": int8 weights rounded to
    nearest, in place. draft_steps > 0: greedy self-speculation (speculative_round). A row ends at its first stop id
    (padded with it after). Returns (idx (B, T + new), stats): "steps" (B, new) the core steps of each new token (the
    first from the prompt's pass), "lengths" (B,) each row's new tokens up to its stop, "drafted"/"accepted",
    "first_step_seconds" (the prompt's pass and the step after it; None when no step followed)."""
    # 1. check the request, and prepare the model (int8 weights, compiled step) once
    num_steps = model.config.mean_recurrence if num_steps is None else num_steps
    B, T = idx.shape
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths).cpu()
    check_request(model.config, B, T, lengths, num_steps, max_new_tokens, exit_criterion, cache_budget, quantize,
                  compile or hasattr(model, "compiled_lengths"))  # a model compiled by an earlier call stays so
    if draft_steps:
        check_speculation(model.config, T, lengths, num_steps, temperature, exit_criterion, warm_start, cache_budget,
                          lookahead)
    rule = exit_rule(model, exit_criterion, exit_threshold)
    if quantize and not isinstance(model.lm_head, Int8Linear):
        quantize_int8(model)
    if compile:
        compile_for_decoding(model)
        model.compiled_lengths.add(lookahead + 1 if draft_steps else 1)

    with decoding_context(model):  # on a CPU, compiled steps freeze the weights in (linear_kernels.py)
        # 2. the cache, the noise starts, and the prompts' pass
        max_len = min(model.config.block_size, 64 * math.ceil((T + max_new_tokens + 1) / 64))  # few distinct shapes
        cache = KVCache(model, B, max_len, num_steps, cache_budget, first=T - lengths)
        table = noise_table(model, max_len, init_scale, generator)  # s_0 by position, shared by the rows
        prefill = lambda context: prefill_cache(model, cache, context, idx.size(1) - context.size(1), num_steps, table)
        # 3. the loop. It keeps one invariant: the cache holds every token of idx, and logits are the next token's. So
        # the prompt takes one pass (as many reads of the weights as a token), and the last new token none
        t0 = time.perf_counter()  # to the end of the first step after the prompt's pass: with compile=True, compiling
        logits, state, noise = prefill(idx)
        stop = torch.tensor(list(stop_ids) or [-1], device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # rows that have produced a stop id
        # the first new token comes from the prompt's pass, at the full r (speculative rounds count their own)
        steps = [] if draft_steps else [torch.full((B, 1), num_steps)]
        drafted, accepted, first_step_seconds = 0, 0, None
        while True:
            # speculation: as many drafts as the cache has room to check and the output still wants (a round gives one
            # token more); with none, a plain greedy token, so the context is cropped where plain decoding crops it
            fit = min(lookahead, max_len - cache.pos - 1, max_new_tokens - (idx.size(1) - T) - 1) if draft_steps else 0
            if fit > 0:
                new, logits, kept = speculative_round(model, logits, cache, noise, num_steps, draft_steps, fit)
                drafted, accepted = drafted + fit, accepted + kept
            else:
                new = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            if draft_steps:  # a speculative run's tokens are all at the full r, counted as they come
                steps.append(torch.full(new.shape, num_steps))
            if stop_ids:  # a row that has stopped repeats its stop id; the others stop at their first
                new = torch.where(done[:, None], stop[0], new)
                done |= torch.isin(new, stop).any(dim=1)
            idx = torch.cat([idx, new], dim=1)
            if idx.size(1) - T >= max_new_tokens or (stop_ids and done.all()):
                break
            if fit <= 0:  # the new token's pass: its cache entries and the next token's logits
                if cache.pos + 1 > max_len:  # the context is full: start again from its last half (nanoGPT crops)
                    logits, state, noise = prefill(idx[:, -(max_len // 2):])
                    used = torch.full((B,), num_steps)
                else:
                    logits, final, used = forward_cached(model, new, cache, num_steps, noise,
                                                         state if warm_start else None, rule)
                    logits, state = logits[:, -1], final[:, -1:]
                if not draft_steps:  # the steps of the token these logits give (speculation counts at selection)
                    steps.append(used[:, None])
            if first_step_seconds is None:  # a 1-token prompt compiles in the prompt's pass, a longer one here
                if idx.is_cuda:
                    torch.cuda.synchronize(idx.device)
                first_step_seconds = time.perf_counter() - t0
    return finish(idx, T, max_new_tokens, stop, steps, drafted, accepted, first_step_seconds)


def noise_table(model, length, init_scale=1.0, generator=None):
    """s_0 by position (>= length, h), drawn 64 positions at a time: position p's does not depend on how many are
    drawn, so a row alone reads what it reads in a batch (each at its own positions)."""
    return torch.cat([model.initial_state((64, model.config.n_embd), init_scale, generator)
                      for _ in range(math.ceil(length / 64))])


def prefill_cache(model, cache, context, cut, num_steps, table):
    """A cache holding context (B, t), at the full r (the reference never exits in the prefill): the next token's
    logits (B, vocab), the last position's final state (a warm start's) and s_0 (B, max_len, h), row b's index p at
    its own position p - first[b]. cut: the tokens cut off the front (a full context goes on from its last half)."""
    if cut:
        cache.set_first((cache.first - cut).clamp(min=0))
    noise = table[cache.positions]  # (B, max_len, h), once per prompt or crop
    cache.rollback(0)
    logits, state, _ = forward_cached(model, context, cache, num_steps, noise, last=True)
    return logits[:, -1], state[:, -1:], noise


def finish(idx, T, max_new_tokens, stop, steps, drafted, accepted, first_step_seconds):
    """generate's result: the prompts and at most max_new_tokens new tokens (a stop id past a row's first), stats."""
    new = idx[:, T:T + max_new_tokens]
    is_stop = torch.isin(new, stop).int()
    after = is_stop.cumsum(dim=1) - is_stop > 0  # past each row's first stop id
    row_lengths = (~after).sum(dim=1).cpu()
    new = torch.where(after, stop[0], new)[:, :int(row_lengths.max())]
    stats = {"steps": torch.cat(steps, dim=1)[:, :new.size(1)], "lengths": row_lengths, "drafted": drafted,
             "accepted": accepted, "first_step_seconds": first_step_seconds}
    return torch.cat([idx[:, :T], new], dim=1), stats


def check_request(cfg, B, T, lengths, num_steps, max_new_tokens, exit_criterion, cache_budget, quantize, compiled):
    """generate's arguments that would otherwise fail deep inside it, each with its reason."""
    if num_steps < 1 or max_new_tokens < 0:
        raise ValueError(f"num_steps (r) must be >= 1 and max_new_tokens >= 0, got {num_steps} and {max_new_tokens}")
    if exit_criterion not in EXIT_THRESHOLDS:
        raise ValueError(f"unknown exit_criterion {exit_criterion!r}; choose one of {list(EXIT_THRESHOLDS)}")
    if cache_budget is not None and (cache_budget < cfg.n_layers_core or cache_budget % cfg.n_layers_core):
        raise ValueError(f"cache_budget must be a multiple of n_layers_core ({cfg.n_layers_core}), it keeps whole "
                         f"steps; got {cache_budget}")
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"the prompt has {T} tokens; give 1 to block_size ({cfg.block_size}), cropping it")
    if lengths.shape != (B,) or not ((1 <= lengths) & (lengths <= T)).all():
        raise ValueError(f"lengths must give each of the {B} rows a length from 1 to {T}, got {lengths.tolist()}")
    if quantize not in (None, "int8") or (quantize and compiled):
        raise ValueError(f"quantize is None or 'int8' (not with compile=True, nor after it); got {quantize!r}")


def check_speculation(cfg, T, lengths, num_steps, temperature, exit_criterion, warm_start, cache_budget, lookahead):
    """What self-speculation needs (under a cache budget below r, a check of several tokens reads other entries)."""
    short_cache = cache_budget is not None and cache_budget // cfg.n_layers_core < num_steps
    if temperature != 0 or exit_criterion != "none" or warm_start or short_cache or not \
            1 <= lookahead < cfg.block_size // 2 or (lengths < T).any():
        raise ValueError("speculative decoding (draft_steps > 0) is greedy: temperature 0, no exit criterion, "
                         "no warm start, no cache budget below r steps, 1 <= lookahead < block_size / 2, and prompts "
                         "of one length")


def pad_prompts(prompts, pad_id=0):
    """Prompts of different lengths (lists of ids) -> idx (B, T) padded on the left with pad_id, and lengths (B,)."""
    T = max(map(len, prompts))
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts])
    return idx, torch.tensor([len(p) for p in prompts])
