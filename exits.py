"""
When is a token done? The exit rules of decode.py compared where they are used, by cached decoding, and a learned
exit gate fit there (the paper's adaptive compute per token; the gate after Ouro's, with the model frozen).

    python exits.py --out_dir=out-reasoning          # the table below; fits and saves out-reasoning/exit_gate.pt
    python exits.py --out_dir=out-shakespeare-char   # a text model: val loss at each rule's mean steps

1. The val rows are decoded one token at a time through decode.py's cache, as generate() does: a token that stops
   early leaves its last step's keys to the tokens after it, so one wrong early exit can spoil the rest of its row.
   Every rule is scored that way ("cached") and, beside it, on states where every position ran every step
   ("offline"), the view a rule is usually tuned on.
2. The gate (decode.Gate): a tiny MLP on each step's signals (decode.Signals), labelled by whether the step's argmax
   is the one the token keeps to r and its state is within `converged` of its last one (no targets needed). Its data
   comes from cached decoding itself, in rounds: first with no exits, then with the previous round's gate deciding
   them at the default threshold, so it learns from the contexts its own exits make. It is fit on the even val
   rows; every table row is scored on the odd ones.
3. Reasoning data: the fraction of labelled positions right at their exit step, by moves so far (the goal:
   goal_accuracy in every group at no more than goal_steps mean steps). Text: the val loss at the exit step.
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import fitted_on, load_checkpoint, trained_init_scale
from common import keyed_generator, pick_device, set_threads, writable_dir
from configurator import configure, fail, number, steps, whole
from dataloader import checkpoint_data
from decode import EXIT_RULES, EXIT_THRESHOLDS, ExitRule, Gate, KVCache, Signals, forward_cached, gate_net

# -----------------------------------------------------------------------------------------------------------
out_dir = "out"
data_dir = ""           # "" means the data the checkpoint was trained on
r = 32                  # the most steps a token may take
rules = {"kl": [1e-2, 1e-3, 1e-4], "latent-diff": [0.03, 0.01], "confident-run": [4, 6, 8, 10, 12],
         "gate": [0.1, 0.03, 0.01, 3e-3]}
fixed_r = [1, 2, 4, 8, 16, 32]
rounds = 2              # gate data: round 1 with no exits, each later one with the last round's gate deciding them
converged = 0.05        # the gate's label: the argmax is the one kept to r, and the state within this relative
                        # distance of s_r (later tokens read its keys at every step it skips)
hidden = 32             # the gate's hidden width
epochs = 10             # passes over its (position, step) pairs, batches of 1024
goal_accuracy = 0.99    # reasoning: this accuracy in every group of moves so far ...
goal_steps = 16.0       # ... at no more than this many mean steps
max_rows = 0            # at most this many val rows (0: all)
batch_size = 64         # rows decoded together
init_scale = None       # std of the noise start s_0 (0: the zero state); None: what the checkpoint trained with
seed = 1337
device = "cpu"
num_threads = 0
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

whole(config, 1, "r", "rounds", "epochs", "batch_size", "hidden")
whole(config, 0, "max_rows", "seed")
if max_rows == 1:
    fail("--max_rows: the gate fits on the even val rows and is scored on the odd ones: give 2 or more (0: all)")
steps(config, "fixed_r", allow_empty=False)
number(config, "goal_accuracy", above=0, high=1)
number(config, "goal_steps", above=0)
if init_scale is not None:
    number(config, "init_scale", low=0)
number(config, "converged", above=0)
for name, thresholds in rules.items():  # before the gate is fit and saved over the last one
    if name not in EXIT_RULES:
        fail(f"--rules: no exit rule {name!r}; decode.py's are {', '.join(EXIT_RULES)}")
    if not isinstance(thresholds, list) or not thresholds or not all(
            isinstance(t, (int, float)) and t > 0 and (name != "gate" or t < 1) for t in thresholds):
        fail(f"--rules: {name}'s thresholds must be a list of numbers > 0{' and < 1' * (name == 'gate')}, got "
             f"{thresholds!r}")
device = pick_device(device)
set_threads(num_threads)
model, checkpoint = load_checkpoint(out_dir, device)
init_scale = trained_init_scale(checkpoint) if init_scale is None else init_scale
writable_dir(out_dir)  # exit_gate.pt and exits.json go there
data = checkpoint_data(checkpoint, data_dir)
reasoning = data.aligned and "examples" in data.meta  # problems (reasoning, problems), not chat rows
if max(fixed_r) > r:  # the default list runs to 32, so a smaller --r leaves some out; say which
    print(f"fixed_r above r = {r} left out: {sorted(n for n in fixed_r if n > r)}")
fixed_r = sorted(n for n in fixed_r if n <= r)


class Allowed(ExitRule):
    """A rule whose stop counts only where allowed (B,): reasoning positions without an answer never stop early,
    as a prompt never does in generate()."""

    def __init__(self, rule, allowed):
        self.rule, self.allowed, self.needs_prediction = rule, allowed, rule.needs_prediction

    def start(self, state):
        self.rule.start(state)

    def done(self, step, state, log_probs):
        return self.rule.done(step, state, log_probs) & self.allowed


def val_rows():
    """x, y (rows, T), which positions may stop early and count (rows, T), and each position's group label."""
    if reasoning:
        x, y = data.batch("val", torch.arange(data.num_blocks("val")))
        targets, difficulty, labelled, first = data.val_problems()
        position = np.arange(x.size(1))
        moves = position - np.maximum.accumulate(np.where(first, position, 0), axis=1) + 1  # (rows, T)
        counted = torch.from_numpy(labelled)
        group = torch.from_numpy(np.where(labelled, moves, 0))
    else:
        # train.py's evaluation blocks, each once (a small split repeated blocks: fit on and scored on both)
        train_config = checkpoint["config"]
        blocks = data.evenly_spaced("val", train_config["eval_iters"] * train_config["batch_size"], once=True)
        x, y = data.batch("val", blocks)
        counted, group = y >= 0, torch.zeros_like(x)  # chat rows: only the answers carry a target
    keep = slice(None, max_rows or None)
    return x[keep], y[keep], counted[keep], group[keep]


def noise_for(rows, T):
    """s_0 for each row, keyed by the row's index: the same in every pass over it."""
    h = model.config.n_embd
    return torch.cat([model.initial_state((1, T, h), init_scale, keyed_generator(seed, int(i), device=device))
                      for i in rows])


@torch.no_grad()
def cached(x, y, counted, rows, rule, num_steps=r, record=None):
    """Cached decoding of rows x (B, T), one token at a time, with rule (None: every step): the exit steps (B, T),
    whether each answer is right (B, T) and its loss (B, T). record: a list that gets, per token, the gate's
    features at every step (B, r, 19) and whether that step's argmax is the one kept to r (B, r)."""
    B, T = x.shape
    cache, noise = KVCache(model, B, T, num_steps), noise_for(rows, T)
    exit_steps, right, loss = torch.full((B, T), num_steps), torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T)
    for t in range(T):
        trace, signals = [], Signals()
        signals.start(noise[:, t])
        watch = (lambda step, state, log_probs: trace.append((signals.features(step, state, log_probs),
                                                              log_probs.argmax(-1), state.float()))) \
            if record is not None else None
        allowed = Allowed(rule, counted[:, t].to(device)) if rule is not None else None
        logits, _, used = forward_cached(model, x[:, t:t + 1].to(device), cache, num_steps, noise, rule=allowed,
                                         watch=watch)
        exit_steps[:, t] = used
        right[:, t] = (logits[:, 0].argmax(-1).cpu() == y[:, t])
        loss[:, t] = F.cross_entropy(logits[:, 0].float().cpu(), y[:, t].clamp(min=0), reduction="none")
        if record is not None:
            features, argmax, states = (torch.stack(z, dim=1).cpu() for z in zip(*trace))  # (B, r, 19 / 1 / h)
            near = (states - states[:, -1:]).norm(dim=-1) < converged * states[:, -1:].norm(dim=-1)
            done = (argmax == argmax[:, -1:]) & near  # its answer final, and its keys nearly so
            kept = done.flip(1).cumprod(1).flip(1).bool()  # ... at this step and every later one
            record.append((features[counted[:, t]], kept[counted[:, t]]))
    return exit_steps, right, loss


@torch.no_grad()
def offline(x, y, counted, rows, rule):
    """The same rule on states where every position ran every step (no cache): exit steps, right, loss."""
    B, T = x.shape
    x, rope = x.to(device), model.rope[:T]
    e = model.embed(x, rope)
    exit_steps, running = torch.full((B * T,), r), counted.flatten().clone()
    right, loss = torch.zeros(B * T, dtype=torch.bool), torch.zeros(B * T)
    target = y.flatten()
    if rule is not None:
        rule.start(noise_for(rows, T).flatten(0, 1))
    for step, state in enumerate(model.iterate(noise_for(rows, T), e, rope, r), start=1):
        log_probs = F.log_softmax(model.predict(state, rope).flatten(0, 1).float(), dim=-1)  # on the model's device
        done = rule.done(step, state.flatten(0, 1), log_probs).cpu() if rule is not None else \
            torch.zeros(B * T, dtype=torch.bool)
        log_probs = log_probs.cpu()
        stop = (running & done) | ((step == r) & (exit_steps == r))  # each position's answer at its exit step
        exit_steps[running & done] = step
        right[stop] = log_probs[stop].argmax(-1) == target[stop]
        loss[stop] = F.nll_loss(log_probs[stop], target[stop].clamp(min=0), reduction="none")
        running &= ~done
    return exit_steps.view(B, T), right.view(B, T), loss.view(B, T)


def fit_gate(features, settled):
    """The gate's MLP on (position, step) pairs, by Adam on binary cross-entropy: seconds on a CPU."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6  # standardised inputs: one learning rate fits all
    net = gate_net(hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    inputs, labels = (features - mean) / std, settled.float()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(1024):
            loss = F.binary_cross_entropy_with_logits(net(inputs[batch])[:, 0], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"net": net.eval(), "mean": mean, "std": std}


def score(exit_steps, right, loss, counted, group):
    """Mean steps and accuracy (reasoning: by group of moves so far) or val loss (text) of the counted positions."""
    point = {"steps": float(exit_steps[counted].float().mean()), "accuracy": float(right[counted].float().mean()),
             "loss": float(loss[counted].mean())}
    for lo, hi in groups:
        at = counted & (group >= lo) & (group <= hi)
        point[f"{lo}-{hi}"] = float(right[at].float().mean())
    return point


def over_rows(passes, rows, rule, **kwargs):
    """passes (cached or offline) over rows, batch by batch: (exit_steps, right, loss) of them all."""
    parts = [passes(x[b], y[b], counted[b], b, rule, **kwargs) for b in rows.split(batch_size)]
    return [torch.cat(z) for z in zip(*parts)]


# -----------------------------------------------------------------------------------------------------------
# the rows: the gate fits on the even ones, everything is scored on the odd ones

x, y, counted, group = val_rows()
if len(x) < 2:  # before the gate is fit and saved over the last one
    fail(f"{data.data_dir} has {len(x)} val row: the gate fits on the even rows and is scored on the odd ones; give "
         "data with 2 or more")
fit_rows, score_rows = torch.arange(0, len(x), 2), torch.arange(1, len(x), 2)
top = int(group.max())
edges = np.unique(np.ceil(np.linspace(0, top, 5)).astype(int)) if reasoning else []
groups = [(int(lo) + 1, int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]  # four groups of moves: 1-8, 9-16, ...
print(f"{out_dir}: r_bar {model.config.mean_recurrence}, exits within r = {r}; {len(x)} val rows "
      f"({int(counted.sum()):,} positions counted), the gate fit on {len(fit_rows)}, scored on {len(score_rows)}")

# the gate: data by cached decoding, in rounds
t0, records, gate = time.time(), [], None
for round_ in range(rounds):
    rule = None if gate is None else Gate(EXIT_THRESHOLDS["gate"], gate["net"], gate["mean"], gate["std"])
    for b in fit_rows.split(batch_size):
        cached(x[b], y[b], counted[b], b, rule, record=records)
    features = torch.cat([f.flatten(0, 1) for f, _ in records])
    settled = torch.cat([k.flatten(0, 1) for _, k in records])
    gate = fit_gate(features, settled)
    print(f"gate round {round_ + 1}: {len(settled):,} (position, step) pairs, {settled.float().mean():.3f} settled "
          f"({time.time() - t0:.0f} s)")
gate_path = os.path.join(out_dir, "exit_gate.pt")
torch.save({"state_dict": gate["net"].state_dict(), "hidden": hidden, "mean": gate["mean"], "std": gate["std"],
            "r": r, "rounds": rounds, "fitted_on": fitted_on(checkpoint)}, gate_path)

# the table
table = []
for n in fixed_r:  # a fixed r: every token runs n steps (cached and offline are the same computation)
    table.append({"rule": "fixed r", "threshold": n, "cached": score(*over_rows(cached, score_rows, None, num_steps=n),
                                                                      counted[score_rows], group[score_rows])})
for name, thresholds in rules.items():
    for threshold in thresholds:
        make = (lambda: Gate(threshold, gate["net"], gate["mean"], gate["std"])) if name == "gate" else \
            (lambda: EXIT_RULES[name](threshold))
        table.append({"rule": name, "threshold": threshold, **{
            view: score(*over_rows(passes, score_rows, make()), counted[score_rows], group[score_rows])
            for view, passes in (("cached", cached), ("offline", offline))}})

names = [f"{lo}-{hi}" for lo, hi in groups]
print(f"\n{'rule':>14} {'threshold':>9} {'steps':>6} " + (f"{'right':>6} " + " ".join(f"{g:>6}" for g in names)
                                                          if reasoning else f"{'loss':>7}")
      + "   offline: steps " + ("right" if reasoning else "loss"))
for row in table:
    c, o = row["cached"], row.get("offline")
    cells = f"{c['accuracy']:6.4f} " + " ".join(f"{c[g]:6.4f}" for g in names) if reasoning else f"{c['loss']:7.4f}"
    default = " (default)" if row["threshold"] == EXIT_THRESHOLDS.get(row["rule"]) else ""
    print(f"{row['rule']:>14} {row['threshold']:>9g} {c['steps']:6.2f} {cells}" + (
        f"   {o['steps']:13.2f} {o['accuracy'] if reasoning else o['loss']:6.4f}" if o else "") + default)
if reasoning:
    good = [row for row in table if row["rule"] != "fixed r" and min(row["cached"][g] for g in names) >= goal_accuracy
            and row["cached"]["steps"] <= goal_steps]
    best = min(good, key=lambda row: row["cached"]["steps"]) if good else None
    print(f"goal: {goal_accuracy} right in every group at <= {goal_steps:g} mean steps: " +
          (f"met by {best['rule']} {best['threshold']:g}, {best['cached']['steps']:.2f} steps" if best else "not met"))
with open(os.path.join(out_dir, "exits.json"), "w") as f:
    json.dump({"r": r, "groups": names, "table": table}, f, indent=1)
print(f"wrote {gate_path} and {os.path.join(out_dir, 'exits.json')}")
