"""
Look inside the loop: the latent state s_i of every position at every step of the core, and when it is done.

    python latents.py --out_dir=out-reasoning                  # pictures, the think-meter and the exit rules
    python latents.py --out_dir=out-shakespeare-char --start="ROMEO:\nBut soft, what light"
    python latents.py --init_from=huginn-0125 --start="The capital of France is" --r=32   # the released model

1. Records s_0 ... s_r of every position of a prompt (--start; for reasoning checkpoints the hardest example
   problem) with model.iterate, the one loop training and decoding use, and saves them to out_dir/latents.pt.
2. Trajectories: s_0 ... s_r of a few tokens, each projected on its own first two principal directions (the
   paper's orbits and convergence pictures).
3. The distance to the final state ||s_i - s_r|| by position and step, the tokens on the axis.
4. The think-meter (reasoning data only): over the whole val split, the step at which each position's prediction
   settles (its argmax never changes again up to r), and where decode.py's kl and latent-diff exits would stop,
   against the moves so far (the position's index within its problem, + 1), with Spearman correlations.
5. Exit rules: accuracy at the exit step against mean steps for the zero-shot rules at several thresholds, two rules
   that look at the prediction itself (its confidence), and a tiny probe fit on the model's own predictions at r
   (no labels) to say "this prediction will not change again"; each val row is scored by a probe fit on the other
   half of the rows. The probe is saved to out_dir/exit_probe.pt. Then the best rules are run again by cached
   decoding, where a token that exits early leaves its last keys to the tokens after it, as generate() does.
Tables are printed; the pictures (matplotlib, optional) go to out_dir (or --plot_dir), named <prefix>*.png.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import get_tokenizer, load_checkpoint, load_released
from common import pick_device, read_prompt, set_threads, writable_dir
from configurator import configure, fail, number, one_of, whole
from dataloader import checkpoint_data
from decode import CONFIDENT, EXIT_THRESHOLDS, KVCache

# -----------------------------------------------------------------------------------------------------------
init_from = "resume"  # "resume": out_dir/ckpt.pt; "huginn-0125" or a folder in its layout: the released model
out_dir = "out"
data_dir = ""         # reasoning: the data with val.bin; "" means the data the checkpoint was trained on
start = ""            # the prompt to look at, or "FILE:path"; "" means the hardest example problem (reasoning)
r = 64                # steps of the core to record: s_0 ... s_r
tokens = []           # positions of the prompt to draw as trajectories; [] means 5 spread over the prompt and the
                      # one farthest from its final state at step r/2 (an orbit, if the prompt has one)
think_meter = None    # None: on for reasoning checkpoints, off for text; True asks for it
goal_accuracy = 0.99  # the goal for an exit rule: this accuracy in every group of moves so far ...
goal_steps = 16.0     # ... at no more than this many steps on average (half of r = 32). The best rule is the
                      # cheapest one with goal_accuracy in every group, whether or not it is within goal_steps
probe_hidden = 32     # the exit probe: a tiny MLP (0: logistic regression) ...
probe_epochs = 10     # ... trained this many passes over (position, step) pairs, batches of 1024
probe_state = False   # also give the probe the state s_i itself (besides the scalar signals)
decode_check = True   # run the best rules again by cached decoding (exits change what later tokens attend to)
batch_size = 64       # val rows per forward pass
init_scale = 1.0      # std of the noise start s_0, relative to training (0: the zero state)
seed = 1337           # the noise starts: torch.Generator().manual_seed(seed) (see record)
plot = True           # draw the pictures (needs matplotlib)
plot_dir = ""         # "" means out_dir
prefix = "latents_"   # picture names: <prefix>trajectories.png, <prefix>distance.png, ...
device = "cpu"
dtype = "float32"     # the released model's weights in float32 or bfloat16
num_threads = 0       # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

whole(config, 1, "r", "probe_epochs", "batch_size")
whole(config, 0, "probe_hidden", "seed")
number(config, "goal_accuracy", above=0, high=1)
number(config, "goal_steps", above=0)
number(config, "init_scale", low=0)
one_of(config, "dtype", ("float32", "bfloat16"))
if any(type(t) is not int for t in tokens):
    fail(f"--tokens must list positions of the prompt (whole numbers), got {tokens!r}")
if think_meter not in (None, True, False):
    fail(f"--think_meter must be True or False, got {think_meter!r}")
start = read_prompt(start)
device = pick_device(device)
set_threads(num_threads)
plot_dir = plot_dir or out_dir
writable_dir(out_dir)  # latents.pt, latents.json and the probe go there, the pictures to plot_dir: checked first
writable_dir(plot_dir, "--plot_dir")

# the model, its tokenizer, and whether it answers reasoning problems
if init_from == "resume":
    model, checkpoint = load_checkpoint(out_dir, device)
    meta = checkpoint["meta"]
else:
    model, meta = load_released(init_from, device, getattr(torch, dtype))
    checkpoint = None
encode, decode = get_tokenizer(meta)
reasoning = "row_len" in meta  # aligned targets: an answer at every labelled position
if think_meter and not reasoning:
    what = "this one continues text" if init_from == "resume" else f"{init_from} is a text model"
    fail(f"the think-meter needs a reasoning checkpoint (prepare_data.py reasoning or problems); {what}: "
         "drop --think_meter")
think_meter = reasoning if think_meter is None else think_meter
cfg = model.config

# the prompt: reasoning problems start with "\n" as in training, the released model's text with <|begin_text|>
if not start:
    if not reasoning:
        fail("give a prompt to look at with --start (only reasoning checkpoints have example problems)")
    start = meta["examples"][-1][1]  # the hardest: examples are sorted by difficulty
if reasoning and not start.startswith("\n"):
    start = "\n" + start
if meta["tokenizer"] == "huginn" and not start.startswith("<|begin_text|>"):
    start = "<|begin_text|>" + start
prompt = encode(start)
if len(prompt) > cfg.block_size:
    print(f"warning: the prompt has {len(prompt)} tokens, more than block_size {cfg.block_size}; keeping the last "
          f"{cfg.block_size}", file=sys.stderr)
    prompt = prompt[-cfg.block_size:]
T = len(prompt)
if T == 0:
    fail("the prompt is empty; give at least one token with --start")
if (r + 1) * T * cfg.n_embd * 4 > 4e9:
    fail(f"recording {r + 1} states of {T} tokens x {cfg.n_embd} would take over 4 GB; shorten --start or lower --r")
if any(not -T <= t < T for t in tokens):
    fail(f"--tokens must be positions of the {T}-token prompt (0 to {T - 1}), got {tokens}")
tokens = [t % T for t in tokens]
labels = [repr(decode([i]))[1:-1] for i in prompt]  # one printable label per token ("\n" shows as \n)
print(f"{init_from if init_from != 'resume' else out_dir}: {model.get_num_params() / 1e6:.2f}M parameters, "
      f"r_bar {cfg.mean_recurrence}; recording s_0 ... s_{r} of {T} tokens")


# -----------------------------------------------------------------------------------------------------------
# 1. record the prompt's states

@torch.no_grad()
def record(idx, generator):
    """s_0 ... s_r of every position of idx (B, T): (r + 1, B, T, h), and each step's prediction (r + 1, B, T).
    s_0 is model.initial_state with this generator, so model(idx, num_steps=r, generator=<same seed>) ends at s_r."""
    rope = model.rope[:idx.size(1)]
    e = model.embed(idx, rope)
    states = [model.initial_state(e, init_scale, generator)]
    states += list(model.iterate(states[0], e, rope, r))  # r states: a prompt's worth, small
    predictions = [model.predict(s, rope).argmax(-1) for s in states]  # s_0's too: the noise start's "answer"
    return torch.stack(states).float().cpu(), torch.stack(predictions).cpu()


def settle_steps(predictions):
    """The step from which each prediction never changes again up to r: predictions (r + 1, ...) -> (...)."""
    same_from_here = (predictions == predictions[-1]).flip(0).cumprod(0).flip(0)  # 1 where it stays final to r
    return len(predictions) - same_from_here.sum(0)  # index of the first step of that final run


t0 = time.time()
idx = torch.tensor([prompt], device=device)
states, predictions = record(idx, torch.Generator(device).manual_seed(seed))
states, predictions = states[:, 0], predictions[:, 0]  # (r + 1, T, h), (r + 1, T)
settled_at = settle_steps(predictions).clamp(min=1)  # s_0 is noise: nothing "settles" before step 1
distance = (states - states[-1]).norm(dim=-1)  # (r + 1, T): ||s_i - s_r||
slowest = int(distance[r // 2].argmax())
tokens = tokens or sorted(set(np.linspace(min(1, T - 1), T - 1, 5).round().astype(int).tolist()) | {slowest})
torch.save({"tokens": prompt, "text": start, "states": states, "predictions": predictions, "r": r, "seed": seed,
            "init_scale": init_scale}, os.path.join(out_dir, "latents.pt"))
print(f"saved s_0 ... s_{r} {tuple(states.shape)} to {os.path.join(out_dir, 'latents.pt')} ({time.time() - t0:.1f} s)")

# the heatmap as text: the distance to the final state relative to its size, at a few steps
shown = list(range(max(0, T - 64), T))  # at most the last 64 positions, in the table and the heatmap
columns = sorted({0, r} | {2**i for i in range(int(math.log2(r)) + 1)})
print("\n||s_i - s_r|| / ||s_r|| by token (rows) and step i (columns); settle: the step from which the argmax "
      "stays the final one")
print(f"{'pos':>4} {'token':>8} " + " ".join(f"{'i=' + str(i):>7}" for i in columns) + "  settle")
relative = distance / states[-1].norm(dim=-1)
for t in shown:
    print(f"{t:>4} {labels[t][:8]:>8} " + " ".join(f"{relative[i, t]:7.3f}" for i in columns) + f"  {settled_at[t]:>6}")


# -----------------------------------------------------------------------------------------------------------
# 2. trajectories: each chosen token's s_0 ... s_r on its own first two principal directions (SVD, no sklearn)

def pca_2d(points, fit):
    """points (n, h) -> their coordinates (n, 2) on the first two principal directions of points[fit], and the
    variance share of each of the two."""
    mean = points[fit].mean(0)
    _, singular, vt = np.linalg.svd(points[fit] - mean, full_matrices=False)
    return (points - mean) @ vt[:2].T, singular[:2] ** 2 / max((singular ** 2).sum(), 1e-30)


# the directions come from s_1 ... s_r: the noise start is far from everything after it and would take the first
# direction to itself, squashing the path the core takes (s_0 is drawn too, projected on the same two directions)
fit = slice(1, None) if r >= 3 else slice(None)
trajectories = {t: pca_2d(states[:, t].numpy().astype(np.float64), fit) for t in tokens}


# -----------------------------------------------------------------------------------------------------------
# the signals an exit rule may look at after each step, the same code offline (4, 5) and in cached decoding (5).
# The rule that won here without a probe, confident-run, is decode.py's exit_criterion="confident-run" (the same
# count). The probe stays here: it is fit per checkpoint, and decode_rows below is the decoding loop that runs it

HISTORY = 3      # the probe also sees the scalar signals of the 3 steps before
SIGNALS = ["kl", "latent-diff", "max-prob", "entropy", "unchanged", "confident-run"]


def exit_signals(step, state, log_probs, memory):
    """Per row, after step `step` (1, 2, ...) of the core: state (B, h) is s_step, log_probs (B, V) its prediction.
    memory is {"state": s_0} before step 1 and carries what the signals need from step to step. Returns the signals
    (B, 6) in the order of SIGNALS and the memory for the next step:
      kl             KL(p_{i-1} || p_i), p_0 uniform: decode.py's "kl"
      latent-diff    ||s_i - s_{i-1}|| / ||s_i||: decode.py's "latent-diff"
      max-prob       the top probability of p_i
      entropy        of p_i, in nats
      unchanged      steps the argmax has stayed the same (0 when it just changed)
      confident-run  steps in a row with max-prob >= CONFIDENT and one argmax (0 when not confident now)"""
    if step == 1:  # the uniform distribution before any step, as decode.py's kl; no argmax yet
        memory = {"state": memory["state"], "log_probs": torch.full_like(log_probs, -math.log(log_probs.size(-1))),
                  "argmax": torch.full(log_probs.shape[:1], -1, device=log_probs.device)}
        memory["unchanged"] = memory["confident_run"] = torch.zeros(log_probs.size(0), device=log_probs.device)
    state, log_probs = state.float(), log_probs.float()
    previous = memory["log_probs"]
    kl = torch.where(previous > -math.inf, previous.exp() * (previous - log_probs), 0).sum(-1).clamp(min=0)
    latent_diff = (state - memory["state"].float()).norm(dim=-1) / state.norm(dim=-1)
    max_log_prob, argmax = log_probs.max(-1)
    entropy = -torch.where(log_probs > -math.inf, log_probs.exp() * log_probs, 0).sum(-1)
    same = argmax == memory["argmax"]
    unchanged = torch.where(same, memory["unchanged"] + 1, 0)
    confident = max_log_prob.exp() >= CONFIDENT
    confident_run = torch.where(confident, torch.where(same, memory["confident_run"], 0) + 1, 0)
    signals = torch.stack([kl, latent_diff, max_log_prob.exp(), entropy, unchanged, confident_run], dim=-1)
    # the probe's view: kl and latent-diff in log10, top probability, entropy, now and at the HISTORY steps before.
    # Below 1e-6 and 1e-5 kl and latent-diff are float32 rounding: a cached pass and a full pass differ there by
    # orders of magnitude, and a probe that learns from those digits fails in decoding (it did: 0.70 right, not 0.999)
    now = torch.stack([kl.clamp(min=1e-6).log10(), latent_diff.clamp(min=1e-5).log10(), max_log_prob.exp(), entropy],
                      dim=-1)  # (B, 4)
    before = now[:, None].repeat(1, HISTORY, 1) if step == 1 else memory["history"][:, :-1]  # step 1 has no past
    history = torch.cat([now[:, None], before], dim=1)  # (B, HISTORY + 1, 4), newest first
    return signals, {"state": state, "log_probs": log_probs, "argmax": argmax, "unchanged": unchanged,
                     "confident_run": confident_run, "history": history}


def probe_features(step, signals, memory, state=None):
    """The exit probe's input (B, 19), or (B, 19 + h) with the state: the scalar signals of this step and the
    HISTORY before it, how long the argmax and the confidence have held (capped at 16 steps), and log(step)."""
    held = (signals[:, 4:6].clamp(max=16) / 8)  # unchanged, confident-run
    step_feature = torch.full_like(held[:, :1], math.log(step))
    extra = [state.float()] if state is not None else []
    return torch.cat([memory["history"].flatten(1), held, step_feature] + extra, dim=-1)


def probe_unsettled(probe, features):
    """The probe's 1 - P(this prediction will not change again): small when done, so a rule stops below a
    threshold as decode.py's kl and latent-diff do."""
    with torch.no_grad():
        return 1 - torch.sigmoid(probe["net"]((features - probe["mean"]) / probe["std"]))[..., 0]


def stops(rule, threshold, signals, features=None, probe=None):
    """Stop now? per row, for signals (..., 6) and probe features (..., F) of any leading shape."""
    column = dict(zip(SIGNALS, signals.unbind(-1)))
    if rule in ("kl", "latent-diff"):
        return column[rule] < threshold
    if rule in ("max-prob", "unchanged", "confident-run"):
        return column[rule] >= threshold
    if rule == "probe":
        return probe_unsettled(probe, features) < threshold
    raise ValueError(f"unknown exit rule {rule!r}")


def probe_net(n_in, hidden):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 1)) if hidden else nn.Linear(n_in, 1)


def load_exit_probe(path):
    """out_dir/exit_probe.pt (written below) -> the probe probe_unsettled takes"""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = probe_net(len(saved["mean"]), saved["hidden"])
    net.load_state_dict(saved["state_dict"])
    return {**saved, "net": net.eval()}


def fit_probe(features, settled):
    """A tiny MLP on features (n, F) -> logit of `settled` (n,), by Adam on binary cross-entropy, seconds on a CPU."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6  # standardised inputs: one learning rate fits all
    net = probe_net(features.size(1), probe_hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    inputs, targets = (features - mean) / std, settled.float()
    for _ in range(probe_epochs):
        for batch in torch.randperm(len(inputs)).split(1024):
            loss = F.binary_cross_entropy_with_logits(net(inputs[batch])[:, 0], targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"net": net.eval(), "mean": mean, "std": std}


# exit rules and thresholds compared in 5 (besides every fixed r and the settle-step oracle); kl and latent-diff stop
# below their threshold, the others at or above it
RULES = {"kl": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], "latent-diff": [0.1, 0.03, 0.01, 0.003],
         "unchanged": [2, 4, 8, 16], "max-prob": [0.5, 0.9, 0.99, 0.999], "confident-run": [2, 4, 6, 8, 10, 12],
         "probe": [0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4]}
result = {"r": r, "prompt": {"tokens": prompt, "settle": settled_at.tolist(), "distance": distance.T.tolist()}}


# -----------------------------------------------------------------------------------------------------------
# 4. the think-meter: when does each val position settle, against the moves so far

def ranks(x):
    """1-based ranks of x, ties sharing their average rank (what Spearman's correlation needs)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2)[inverse]


def spearman(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
        return float("nan")  # a constant has no ranks to correlate
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def first_stop(stop):
    """The exit step (1 .. r) of each row of stop (N, r): the first step that says stop, else r."""
    return torch.where(stop.any(1), stop.int().argmax(1) + 1, stop.size(1))


if think_meter:
    data = checkpoint_data(checkpoint, data_dir)
    if not os.path.isfile(os.path.join(data.data_dir, "val_difficulty.bin")):
        fail(f"{data.data_dir} has no val_difficulty.bin; run: python prepare_data.py reasoning (or problems)")
    n_rows, row_len = data.num_blocks("val"), meta["row_len"]
    targets, difficulty, labelled, first = data.val_problems()  # (rows, row_len) each
    if not labelled.any():
        fail("val_targets.bin has no labelled positions; nothing to measure")
    # moves so far at a labelled position = its index within its problem + 1
    position = np.arange(row_len)
    moves = (position - np.maximum.accumulate(np.where(first, position, 0), axis=1) + 1)[labelled]  # (N,)
    row_of = np.nonzero(labelled)[0]  # (N,) the val row of each labelled position
    max_moves = int(moves.max())
    edges = np.unique(np.ceil(np.linspace(0, max_moves, 5)).astype(int))  # four groups: 1-8, 9-16, ... of 32
    groups = [(int(lo) + 1, int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]

    # every val row run to r from noise; per labelled position and step: the signals, the probe's features and the
    # answer. Only these are kept, never the states of the whole split: (N, r, 6 + F) floats
    t0 = time.time()
    generator = torch.Generator(device).manual_seed(seed)
    signals, features, answers = [], [], []
    with torch.no_grad():
        for rows in torch.arange(n_rows).split(batch_size):
            x, _ = data.batch("val", rows)
            x, keep = x.to(device), torch.from_numpy(labelled[rows.numpy()]).flatten().to(device)
            rope = model.rope[:row_len]
            e = model.embed(x, rope)
            state = model.initial_state(e, init_scale, generator)
            memory, per_step = {"state": state.flatten(0, 1)}, []
            for step, state in enumerate(model.iterate(state, e, rope, r), start=1):
                flat = state.flatten(0, 1)  # (B * T, h): every position is a row of its own
                log_probs = F.log_softmax(model.predict(state, rope).flatten(0, 1), dim=-1)
                s, memory = exit_signals(step, flat, log_probs, memory)
                f = probe_features(step, s, memory, flat if probe_state else None)
                per_step.append((s[keep].cpu(), f[keep].cpu(), memory["argmax"][keep].cpu()))
            signals.append(torch.stack([p[0] for p in per_step], 1))
            features.append(torch.stack([p[1] for p in per_step], 1))
            answers.append(torch.stack([p[2] for p in per_step], 1))
    signals, features, answers = torch.cat(signals), torch.cat(features), torch.cat(answers)  # (N, r, ...)
    target = torch.from_numpy(targets[labelled])
    correct = answers == target[:, None]  # (N, r): the answer at each step is right
    settle = settle_steps(answers.T) + 1  # the argmax-settle step, 1 .. r (answers[:, 0] is step 1's)
    settled = torch.arange(1, r + 1) >= settle[:, None]  # (N, r): the probe's label, the model's own, at r
    print(f"\nthink-meter: {len(moves):,} labelled val positions of {n_rows} rows run to r = {r} "
          f"({time.time() - t0:.1f} s); right at r: {correct[:, -1].float().mean():.4f}")

    # the zero-shot exits at decode.py's default thresholds, and the settle step, by moves so far
    meters = {"argmax-settle": settle,
              f"kl < {EXIT_THRESHOLDS['kl']:g}": first_stop(stops("kl", EXIT_THRESHOLDS["kl"], signals)),
              f"latent-diff < {EXIT_THRESHOLDS['latent-diff']:g}":
                  first_stop(stops("latent-diff", EXIT_THRESHOLDS["latent-diff"], signals))}

    # -------------------------------------------------------------------------------------------------------
    # 5. exit rules: accuracy at the exit step against mean steps

    def score(exit_step):
        """mean steps, and the fraction of positions right at their exit step: over all and per group of moves"""
        right = correct.gather(1, (exit_step - 1)[:, None])[:, 0].numpy()
        point = {"mean_steps": float(exit_step.float().mean()), "accuracy": float(right.mean())}
        for lo, hi in groups:
            in_group = (moves >= lo) & (moves <= hi)
            point[f"{lo}-{hi}"] = float(right[in_group].mean())
            point[f"steps {lo}-{hi}"] = float(exit_step.numpy()[in_group].mean())
        return point

    # the probe: label = "the argmax is already the one it keeps to r". Cross-fitted: rows of one parity are scored
    # by the probe fit on the other's, so no reported point is on the probe's own training data
    t0 = time.time()
    fold = torch.from_numpy(row_of % 2)
    probes, unsettled = [], torch.zeros(settled.shape)
    for k in (0, 1):
        probes.append(fit_probe(features[fold != k].flatten(0, 1), settled[fold != k].flatten()))
        unsettled[fold == k] = probe_unsettled(probes[k], features[fold == k])
    # the probe to keep (out_dir/exit_probe.pt, for decode.py) is fit on all val rows
    probe = fit_probe(features.flatten(0, 1), settled.flatten())
    print(f"exit probe: {probe_hidden or 'logistic'} hidden, {features.size(-1)} features, fit 3 times on "
          f"{settled.numel() // 2:,} (position, step) pairs ({time.time() - t0:.1f} s)")

    def exit_steps(rule, threshold):
        return first_stop(unsettled < threshold if rule == "probe" else stops(rule, threshold, signals))

    pareto = [{"rule": "fixed r", "threshold": n, **score(torch.full((len(moves),), n))} for n in range(1, r + 1)]
    pareto.append({"rule": "settle oracle", "threshold": None, **score(settle)})
    pareto += [{"rule": rule, "threshold": threshold, **score(exit_steps(rule, threshold))}
               for rule, thresholds in RULES.items() for threshold in thresholds]

    def cheapest(points):
        """the point of fewest mean steps with goal_accuracy in every group of moves, else the most accurate"""
        good = [p for p in points if min(p[f"{lo}-{hi}"] for lo, hi in groups) >= goal_accuracy]
        return min(good, key=lambda p: p["mean_steps"]) if good else max(points, key=lambda p: p["accuracy"])

    rules_only = [p for p in pareto if p["rule"] not in ("fixed r", "settle oracle")]
    best = cheapest(rules_only)
    best_zero_shot = cheapest([p for p in rules_only if p["rule"] != "probe"])
    best_fixed = cheapest([p for p in pareto if p["rule"] == "fixed r"])
    best_probe = cheapest([p for p in rules_only if p["rule"] == "probe"])
    meters[f"best: {best['rule']} {best['threshold']:g}"] = exit_steps(best["rule"], best["threshold"])

    probe_path = os.path.join(out_dir, "exit_probe.pt")
    torch.save({"state_dict": probe["net"].state_dict(), "hidden": probe_hidden, "mean": probe["mean"],
                "std": probe["std"], "with_state": probe_state, "confident": CONFIDENT, "history": HISTORY,
                "threshold": best_probe["threshold"], "r": r}, probe_path)
    probe = load_exit_probe(probe_path)  # what decode.py would load

    # the tables
    print(f"\nthink-meter: the step at which each position's answer settles (argmax-settle: it never changes again up "
          f"to r = {r}) and where each exit rule stops, by moves so far; mean and standard deviation")
    print(f"{'moves':>5} {'positions':>9}  " + "  ".join(f"{name:>17}" for name in meters))
    for m in range(1, max_moves + 1):
        at = moves == m
        if at.any():
            cells = [f"{v[at].float().mean():8.2f} +-{v[at].float().std(unbiased=False):5.2f}"
                     for v in meters.values()]
            print(f"{m:>5} {int(at.sum()):>9}  " + "  ".join(f"{c:>17}" for c in cells))
    print("Spearman correlation with the moves so far: " + ", ".join(
        f"{name} {spearman(moves, meter.numpy()):.3f}" for name, meter in meters.items()))
    slope = np.polyfit(moves, settle.numpy(), 1)[0] if max_moves > 1 else float("nan")
    print(f"argmax-settle rises {slope:.2f} steps per move (least squares), from "
          f"{settle[moves == 1].float().mean():.2f} at 1 move to {settle[moves == max_moves].float().mean():.2f} "
          f"at {max_moves}")
    result["think_meter"] = {"moves": moves.tolist(), "groups": groups, "slope_steps_per_move": float(slope),
                             **{name: meter.tolist() for name, meter in meters.items()},
                             "spearman": {name: spearman(moves, meter.numpy()) for name, meter in meters.items()}}

    group_names = [f"{lo}-{hi}" for lo, hi in groups]
    print(f"\nexit rules: mean steps and the fraction of labelled val positions right at their exit step (r = {r} at "
          "most); the probe's points are cross-fitted (each row scored by a probe fit on the other half)")
    print(f"{'rule':>14} {'threshold':>9} {'steps':>6} {'all':>6} " + " ".join(f"{g:>6}" for g in group_names)
          + f"  steps {group_names[-1]}")
    fixed_shown = {1, 2, 4, 8, 12, 16, 20, 24, 32, r, best_fixed["threshold"]}
    for p in pareto:
        if p["rule"] == "fixed r" and p["threshold"] not in fixed_shown:
            continue
        threshold = "" if p["threshold"] is None else f"{p['threshold']:g}"
        print(f"{p['rule']:>14} {threshold:>9} {p['mean_steps']:6.2f} {p['accuracy']:6.4f} "
              + " ".join(f"{p[g]:6.4f}" for g in group_names) + f"  {p['steps ' + group_names[-1]]:10.2f}")
    describe = lambda p: (f"{p['rule']} {p['threshold']:g}: {p['mean_steps']:.2f} steps, accuracy {p['accuracy']:.4f} "
                          f"(worst group {min(p[g] for g in group_names):.4f})")
    reached = min(best[g] for g in group_names) >= goal_accuracy and best["mean_steps"] <= goal_steps
    print(f"goal: accuracy >= {goal_accuracy} in every group of moves so far, at <= {goal_steps:g} mean steps")
    print(f"best rule       {describe(best)}: {'meets' if reached else 'misses'} the goal")
    print(f"best zero-shot  {describe(best_zero_shot)}")
    print(f"best fixed r    {describe(best_fixed)}")
    print(f"the probe saved to {probe_path} (fit on all val rows; threshold {best_probe['threshold']:g})")
    result["pareto"], result["best"] = pareto, {"rule": best, "zero_shot": best_zero_shot, "fixed": best_fixed,
                                                "probe": best_probe}

    # -------------------------------------------------------------------------------------------------------
    # cached decoding: each token fed alone through decode.py's KV cache, stopping at its own exit step. A later
    # token then reads an exited token's last keys at the steps it skipped (fill_after_exit), so exits change what
    # it sees; offline above, every earlier position ran all r steps

    @torch.no_grad()
    def decode_rows(x, may_exit, rule, threshold, probe, noise):
        """Exit steps (B, T) and answers (B, T) of rows x (B, T) decoded one token at a time; noise (B, T, h) = s_0.
        Only positions where may_exit (B, T) is True stop early: the others carry no answer and run all r steps, as
        a prompt does in generate()'s prefill. This is forward_cached's loop with the rule's stop."""
        B, T = x.shape
        cache = KVCache(model, B, T, r)
        steps_used, answers = torch.full((B, T), r), torch.zeros(B, T, dtype=torch.long)
        for t in range(T):
            rope = cache.start(1)
            e = model.embed(x[:, t:t + 1], rope, cache.prelude())
            state = noise[:, t:t + 1].clone()
            memory, running = {"state": state[:, -1]}, torch.ones(B, dtype=torch.bool, device=x.device)
            for step, new_state in enumerate(model.iterate(state, e, rope, r, cache), start=1):
                log_probs = F.log_softmax(model.predict(new_state, rope, cache.coda())[:, -1], dim=-1)
                signals_now, memory = exit_signals(step, new_state[:, -1], log_probs, memory)
                features_now = probe_features(step, signals_now, memory, new_state[:, -1] if probe_state else None) \
                    if rule == "probe" else None
                state = torch.where(running[:, None, None], new_state, state)  # stopped rows keep theirs
                stop = running & may_exit[:, t] & stops(rule, threshold, signals_now, features_now, probe)
                steps_used[stop.cpu(), t] = step
                running &= ~stop
                if not running.any():
                    break
            for row in (steps_used[:, t] < r).nonzero().flatten().tolist():
                cache.fill_after_exit(row, int(steps_used[row, t]), r)
            answers[:, t] = model.predict(state, rope, cache.coda())[:, -1].argmax(-1).cpu()
            cache.advance(1)
        return steps_used, answers

    if decode_check:
        checks = dict.fromkeys([("kl", EXIT_THRESHOLDS["kl"])] + [(p["rule"], p["threshold"]) for p in
                                                                  (best_zero_shot, best_probe, best)])
        print(f"\ncached decoding (one token at a time, early exits freeze a token's keys for the tokens after it); "
              f"noise: torch.Generator().manual_seed({seed + 1}), (rows, {row_len}, h) per batch of {batch_size} rows, "
              f"even rows then odd rows")
        print(f"{'rule':>14} {'threshold':>9} {'steps':>6} {'all':>6} " + " ".join(f"{g:>6}" for g in group_names)
              + "   offline: steps    all")
        result["decode_check"] = []
        for rule, threshold in checks:
            t0 = time.time()
            generator = torch.Generator(device).manual_seed(seed + 1)
            steps_used, right = torch.zeros(len(moves), dtype=torch.long), np.zeros(len(moves), dtype=bool)
            for k in (0, 1):  # each half of the rows with the probe that did not see it
                for rows in torch.arange(k, n_rows, 2).split(batch_size):
                    x, y = data.batch("val", rows)
                    noise = model.initial_state(torch.empty(len(rows), row_len, cfg.n_embd, device=device,
                                                            dtype=model.ln_f.weight.dtype), init_scale, generator)
                    used, answer = decode_rows(x.to(device), (y >= 0).to(device), rule, threshold, probes[k], noise)
                    where = torch.from_numpy(np.isin(row_of, rows.numpy()))  # these rows' labelled positions
                    steps_used[where] = used[y >= 0]
                    right[where.numpy()] = (answer == y)[y >= 0].numpy()
            point = {"rule": rule, "threshold": threshold, "mean_steps": float(steps_used.float().mean()),
                     "accuracy": float(right.mean()),
                     **{f"{lo}-{hi}": float(right[(moves >= lo) & (moves <= hi)].mean()) for lo, hi in groups}}
            offline = next(p for p in pareto if p["rule"] == rule and p["threshold"] == threshold)
            print(f"{rule:>14} {threshold:>9g} {point['mean_steps']:6.2f} {point['accuracy']:6.4f} "
                  + " ".join(f"{point[g]:6.4f}" for g in group_names)
                  + f"   {offline['mean_steps']:13.2f} {offline['accuracy']:6.4f}   ({time.time() - t0:.0f} s)")
            result["decode_check"].append(point)

with open(os.path.join(out_dir, "latents.json"), "w") as f:
    json.dump(result, f)
print(f"\nwrote {os.path.join(out_dir, 'latents.json')}")


# -----------------------------------------------------------------------------------------------------------
# pictures

if plot:
    try:
        import matplotlib
    except ImportError:
        print("no pictures: pip install matplotlib to draw them (the tables above are the same numbers)")
        plot = False
if plot:
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    os.makedirs(plot_dir, exist_ok=True)
    name = init_from if init_from != "resume" else os.path.basename(os.path.normpath(out_dir))
    newline = encode("\n")[0] if reasoning else None  # a reasoning problem starts after one
    written = []

    def save(fig, what):
        path = os.path.join(plot_dir, f"{prefix}{what}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    # trajectories: one panel per token, the steps coloured from dark (s_0) to light (s_r); a step where the state
    # moves by more than 10% of its size is numbered, so plateaus (many steps on one point) and jumps can be told apart
    cols = min(3, len(tokens))
    rows_ = (len(tokens) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols + 0.8, 3.1 * rows_ + 0.5), squeeze=False)
    moved = ((states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1) > 0.1).numpy()  # (r, T)
    for ax, t in zip(axes.flat, tokens):
        xy, share = trajectories[t]
        ax.plot(xy[:, 0], xy[:, 1], color="lightgray", linewidth=0.8, zorder=1)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(r + 1), cmap="viridis", vmin=0, vmax=r, s=14, zorder=2)
        ax.scatter(*xy[0], marker="x", color="red", s=40, zorder=3, label="s_0 (noise)")
        ax.scatter(*xy[-1], marker="*", color="black", s=90, zorder=3, label=f"s_{r}")
        for i in np.nonzero(moved[:, t])[0][:12] + 1:  # the first dozen jumps
            ax.annotate(str(i), xy[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
        where = f", {t - max(i for i in range(t + 1) if prompt[i] == newline)} moves so far" if reasoning else ""
        ax.set_title(f"position {t} {labels[t]!r}{where}\nargmax settles at step {int(settled_at[t])}", fontsize=8)
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of the variance)", fontsize=7)
        ax.set_ylabel(f"PC2 ({share[1]:.0%})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(tokens):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{name}: s_0 ... s_{r} of single tokens, each on its own first two principal directions "
                 "of s_1 ... s_r (numbers: steps that move the state)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.colorbar(points, cax=fig.add_axes((0.93, 0.15, 0.015, 0.7)), label="step i")
    save(fig, "trajectories")

    # distance to the final state, log scale, and where each position's argmax settles
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.16 * len(shown)))
    shown_distance = distance[:, shown].T.numpy()  # (positions, r + 1)
    image = ax.imshow(np.log10(shown_distance + 1e-6), aspect="auto", cmap="magma", interpolation="nearest",
                      vmin=max(-4, float(np.log10(shown_distance + 1e-6).min())))
    ax.scatter(settled_at[shown].numpy(), np.arange(len(shown)), s=6, color="cyan", label="argmax settles")
    ax.set_yticks(range(len(shown)), [f"{t} {labels[t]}" for t in shown], fontsize=6)
    ax.set_xlabel("step i")
    ax.set_title(f"{name}: log10 ||s_i - s_{r}|| by position and step", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.colorbar(image, ax=ax, label="log10 distance")
    fig.tight_layout()
    save(fig, "distance")

    if think_meter:
        # think-meter: mean exit / settle step by moves so far, a band of one standard deviation
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        m_values = np.array(sorted(set(moves.tolist())))
        for (label, meter), color in zip(meters.items(), ["black", "tab:blue", "tab:orange", "tab:green"]):
            v = meter.float().numpy()
            mean = np.array([v[moves == m].mean() for m in m_values])
            std = np.array([v[moves == m].std() for m in m_values])
            ax.plot(m_values, mean, marker="o", markersize=3, color=color,
                    label=f"{label} (Spearman {spearman(moves, v):.2f})")
            ax.fill_between(m_values, mean - std, mean + std, color=color, alpha=0.15)
        trained = meta.get("train_max_difficulty")
        if trained:
            ax.axvline(trained + 0.5, color="gray", linestyle=":", label=f"trained up to {trained} moves")
        ax.set(xlabel="moves so far", ylabel="step", title=f"{name}: when does each answer settle? (r = {r})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, "think_meter")

        # Pareto: accuracy at the exit step against mean steps, all positions and the hardest group
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
        hardest = group_names[-1]
        markers = {"kl": "o", "latent-diff": "s", "unchanged": "v", "max-prob": "^", "confident-run": "D", "probe": "P"}
        for ax, key in zip(axes, ["accuracy", hardest]):
            error = lambda p: max(1 - p[key], 1e-4)  # no errors at all drawn at 1e-4, the log scale's floor
            fixed = [p for p in pareto if p["rule"] == "fixed r"]
            ax.plot([p["mean_steps"] for p in fixed], [error(p) for p in fixed], color="gray", label="fixed r")
            for rule, marker in markers.items():
                points = [p for p in pareto if p["rule"] == rule]
                ax.plot([p["mean_steps"] for p in points], [error(p) for p in points], marker=marker,
                        markersize=4, label=rule)
            oracle = next(p for p in pareto if p["rule"] == "settle oracle")
            ax.scatter(oracle["mean_steps"], error(oracle), marker="*", s=150, color="black",
                       zorder=5, label="settle oracle")
            ax.scatter(best["mean_steps"], error(best), s=200, facecolors="none", edgecolors="red",
                       zorder=5, label="best rule")
            for i, p in enumerate(result.get("decode_check", [])):  # the same rules, by cached decoding
                ax.scatter(p["mean_steps"], error(p), marker="x", s=60, color="red", zorder=6,
                           label="cached decoding" if i == 0 else None)
            ax.axhline(1 - goal_accuracy, color="red", linestyle=":", linewidth=0.8)
            ax.axvline(goal_steps, color="red", linestyle=":", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylim(1e-4 * 0.8, 1)
            ax.set(xlabel="mean steps per position (over all positions)", ylabel="error (1 - accuracy)",
                   title=f"{'all positions' if key == 'accuracy' else hardest + ' moves so far'}")
            ax.grid(alpha=0.3, which="both")
        axes[1].legend(fontsize=7, loc="upper right")
        fig.suptitle(f"{name}: exit rules, error at the exit step against steps spent (dotted: the goal)", fontsize=9)
        fig.tight_layout()
        save(fig, "pareto")
    print("wrote " + ", ".join(written))
