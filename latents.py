"""
Look inside the loop: the latent state s_i of every position at every step of the core, and when it is done.

    python latents.py --out_dir=out-reasoning                  # the pictures and the think-meter
    python latents.py --out_dir=out-shakespeare-char --start="ROMEO:\nBut soft, what light"
    python latents.py --init_from=huginn-0125 --start="The capital of France is" --r=32   # the released model

1. Records s_0 ... s_r of every position of a prompt (--start; for reasoning checkpoints the hardest example
   problem) with model.iterate, the one loop training and decoding use, and saves them to out_dir/latents.pt.
2. Trajectories: s_0 ... s_r of a few tokens, each projected on its own first two principal directions (the
   paper's orbits and convergence pictures); the distance to the final state ||s_i - s_r|| by position and step.
3. The think-meter (reasoning data only): over the whole val split, the step at which each position's prediction
   settles (its argmax never changes again up to r), and where decode.py's exit rules would stop it, against the
   moves so far, with Spearman correlations. Which rule to decode with, measured where it is used: exits.py.
Tables are printed; the pictures (matplotlib, optional) go to out_dir (or --plot_dir), named <prefix>*.png.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import get_tokenizer, load_checkpoint, load_released, trained_init_scale
from common import pick_device, pyplot, read_prompt, set_threads, writable_dir
from configurator import configure, fail, number, one_of, whole
from dataloader import checkpoint_data
from decode import EXIT_RULES, EXIT_THRESHOLDS, state_change

# -----------------------------------------------------------------------------------------------------------
init_from = "resume"  # "resume": out_dir/ckpt.pt; "huginn-0125" or a folder in its layout: the released model
out_dir = "out"
data_dir = ""         # reasoning: the data with val.bin; "" means the data the checkpoint was trained on
start = ""            # the prompt to look at, or "FILE:path"; "" means the hardest example problem (reasoning)
r = 64                # steps of the core to record: s_0 ... s_r
tokens = []           # positions of the prompt to draw as trajectories; [] means 5 spread over the prompt and the
                      # one farthest from its final state at step r/2 (an orbit, if the prompt has one)
think_meter = None    # None: on for reasoning checkpoints, off for text; True asks for it
batch_size = 64       # val rows per forward pass
init_scale = None     # std of the noise start s_0 (0: the zero state); None: what the model trained with
seed = 1337           # the noise starts: torch.Generator().manual_seed(seed) (see record)
plot = True           # draw the pictures (needs matplotlib)
plot_dir = ""         # "" means out_dir
prefix = "latents_"   # picture names: <prefix>trajectories.png, <prefix>distance.png, ...
device = "cpu"
dtype = "float32"     # the released model's weights in float32 or bfloat16
num_threads = 0       # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

whole(config, 1, "r", "batch_size")
whole(config, 0, "seed")
if init_scale is not None:
    number(config, "init_scale", low=0)
one_of(config, "dtype", ("float32", "bfloat16"))
if init_from == "resume" and dtype != "float32":
    fail("--dtype is the released model's (its weights in that dtype); a checkpoint runs in float32: drop it")
if any(type(t) is not int for t in tokens):
    fail(f"--tokens must list positions of the prompt (whole numbers), got {tokens!r}")
if think_meter not in (None, True, False):
    fail(f"--think_meter must be True or False, got {think_meter!r}")
start = read_prompt(start)
device = pick_device(device)
set_threads(num_threads)
plot_dir = plot_dir or out_dir
writable_dir(out_dir)  # latents.pt and latents.json go there, the pictures to plot_dir: checked first
writable_dir(plot_dir, "--plot_dir")
if "/" in prefix or os.sep in prefix:
    fail(f"--prefix={prefix} is the start of the pictures' file names; a folder for them goes in --plot_dir")

# the model, its tokenizer, and whether it answers reasoning problems
if init_from == "resume":
    model, checkpoint = load_checkpoint(out_dir, device)
    meta = checkpoint["meta"]
else:
    model, meta = load_released(init_from, device, getattr(torch, dtype))
    checkpoint = None
init_scale = trained_init_scale(checkpoint, meta) if init_scale is None else init_scale
encode, decode = get_tokenizer(meta)
reasoning = "examples" in meta  # problems (prepare_data.py reasoning / problems); chat rows are text
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
if len(prompt) > cfg.block_size and reasoning:  # the moves so far are counted from the problem's "\n"
    fail(f"the problem has {len(prompt) - 1} moves; this checkpoint reads {cfg.block_size - 1} at most: shorten "
         "--start")
if len(prompt) > cfg.block_size:
    print(f"warning: the prompt has {len(prompt)} tokens, more than block_size {cfg.block_size}; keeping the last "
          f"{cfg.block_size}", file=sys.stderr)
    keep = int(meta["tokenizer"] == "huginn")  # <|begin_text|> stays first
    prompt = prompt[:keep] + prompt[len(prompt) - cfg.block_size + keep:]
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
    states = [model.initial_state(e.shape, init_scale, generator)]
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
torch.save({"tokens": prompt, "text": decode(prompt), "states": states, "predictions": predictions, "r": r,
            "seed": seed, "init_scale": init_scale}, os.path.join(out_dir, "latents.pt"))
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
# 3. the think-meter (reasoning data): over the whole val split, the step from which each labelled position's answer
#    stays the one it has at r, and where decode.py's exit rules (at their defaults) would stop it, by moves so far

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


@torch.no_grad()
def think_meter_of(data):
    """Every val row run to r from noise (every position runs every step): per labelled position, the moves so far
    (N,), and the steps {meter: (N,)} at which its argmax settles and each exit rule would stop it."""
    targets, difficulty, labelled, first = data.val_problems()  # (rows, T) each
    if not labelled.any():
        fail("val_targets.bin has no labelled positions; nothing to measure")
    position = np.arange(labelled.shape[1])  # moves so far at a labelled position: its index in its problem + 1
    moves = (position - np.maximum.accumulate(np.where(first, position, 0), axis=1) + 1)[labelled]
    rules = {f"{name} {EXIT_THRESHOLDS[name]:g}": EXIT_RULES[name](EXIT_THRESHOLDS[name])
             for name in ("kl", "latent-diff", "confident-run")}
    generator, meters = torch.Generator(device).manual_seed(seed), {"argmax-settle": []} | {n: [] for n in rules}
    for rows in torch.arange(data.num_blocks("val")).split(batch_size):
        x, _ = data.batch("val", rows)
        keep = torch.from_numpy(labelled[rows.numpy()]).flatten()
        rope = model.rope[:x.size(1)]
        e = model.embed(x.to(device), rope)
        state = model.initial_state(e.shape, init_scale, generator)
        exit_step = {name: torch.full((keep.numel(),), r) for name in rules}
        for rule in rules.values():
            rule.start(state.flatten(0, 1))
        argmaxes = []
        for step, state in enumerate(model.iterate(state, e, rope, r), start=1):
            log_probs = F.log_softmax(model.predict(state, rope).flatten(0, 1).float(), dim=-1)
            argmaxes.append(log_probs.argmax(-1).cpu())
            for name, rule in rules.items():  # the first step each rule says stop
                done = rule.done(step, state.flatten(0, 1), log_probs).cpu() & (exit_step[name] == r)
                exit_step[name][done & (step < r)] = step
        meters["argmax-settle"].append(settle_steps(torch.stack(argmaxes))[keep] + 1)  # steps 1 .. r
        for name in rules:
            meters[name].append(exit_step[name][keep])
    return moves, {name: torch.cat(values) for name, values in meters.items()}


def print_think_meter(moves, meters):
    print(f"\nthink-meter: {len(moves):,} labelled val positions run to r = {r}; the step at which each position's "
          f"answer settles (argmax-settle: it never changes again up to r) and where each exit rule stops, by moves "
          f"so far; mean and standard deviation")
    print(f"{'moves':>5} {'positions':>9}  " + "  ".join(f"{name:>17}" for name in meters))
    for m in range(1, int(moves.max()) + 1):
        at = moves == m
        if at.any():
            cells = [f"{v[at].float().mean():8.2f} +-{v[at].float().std(unbiased=False):5.2f}" for v in meters.values()]
            print(f"{m:>5} {int(at.sum()):>9}  " + "  ".join(f"{c:>17}" for c in cells))
    correlations = {name: spearman(moves, meter.numpy()) for name, meter in meters.items()}
    print("Spearman correlation with the moves so far: " + ", ".join(f"{n} {c:.3f}" for n, c in correlations.items()))
    settle = meters["argmax-settle"].numpy()
    slope = np.polyfit(moves, settle, 1)[0] if moves.max() > 1 else float("nan")
    print(f"argmax-settle rises {slope:.2f} steps per move (least squares), from {settle[moves == 1].mean():.2f} at "
          f"1 move to {settle[moves == moves.max()].mean():.2f} at {moves.max()}; python exits.py compares the "
          "exit rules where they are used, by cached decoding")
    return {"moves": moves.tolist(), "slope_steps_per_move": float(slope), "spearman": correlations,
            **{name: meter.tolist() for name, meter in meters.items()}}


result = {"r": r, "prompt": {"tokens": prompt, "settle": settled_at.tolist(), "distance": distance.T.tolist()}}
if think_meter:
    data = checkpoint_data(checkpoint, data_dir)
    t0 = time.time()
    moves, meters = think_meter_of(data)
    result["think_meter"] = print_think_meter(moves, meters)
    print(f"({time.time() - t0:.1f} s)")
with open(os.path.join(out_dir, "latents.json"), "w") as f:
    json.dump(result, f)
print(f"\nwrote {os.path.join(out_dir, 'latents.json')}")


# -----------------------------------------------------------------------------------------------------------
# pictures, each beside what it draws

def draw_trajectories(plt, name, moved):
    """One panel per token, its steps coloured from dark (s_0) to light (s_r); a step that moves the state by more
    than 10% of its size is numbered, so plateaus (many steps on one point) and jumps can be told apart."""
    newline = encode("\n")[0] if reasoning else None  # a reasoning problem starts after one
    cols = min(3, len(tokens))
    rows_ = (len(tokens) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols + 0.8, 3.1 * rows_ + 0.5), squeeze=False)
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
    return fig


def draw_distance(plt, name):
    """The distance to the final state by position and step, log scale, and where each position's argmax settles."""
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
    return fig


def draw_think_meter(plt, name, moves, meters):
    """Mean settle / exit step by moves so far, a band of one standard deviation."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = np.array(sorted(set(moves.tolist())))
    for (label, meter), color in zip(meters.items(), ["black", "tab:blue", "tab:orange", "tab:green"]):
        v = meter.float().numpy()
        mean = np.array([v[moves == m].mean() for m in values])
        std = np.array([v[moves == m].std() for m in values])
        label = f"{label} (Spearman {spearman(moves, v):.2f})"
        ax.plot(values, mean, marker="o", markersize=3, color=color, label=label)
        ax.fill_between(values, mean - std, mean + std, color=color, alpha=0.15)
    trained = meta.get("train_max_difficulty")
    if trained:
        ax.axvline(trained + 0.5, color="gray", linestyle=":", label=f"trained up to {trained} moves")
    ax.set(xlabel="moves so far", ylabel="step", title=f"{name}: when does each answer settle? (r = {r})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


missing = "no pictures: pip install matplotlib to draw them (the tables above are the same numbers)"
plt = pyplot(missing) if plot else None
if plt:
    name = init_from if init_from != "resume" else os.path.basename(os.path.normpath(out_dir))
    moved = (state_change(states[:-1], states[1:]) > 0.1).numpy()  # (r, T): the steps that move a state
    figures = {"trajectories": draw_trajectories(plt, name, moved), "distance": draw_distance(plt, name)}
    if think_meter:
        figures["think_meter"] = draw_think_meter(plt, name, moves, meters)
    for what, fig in figures.items():
        fig.savefig(os.path.join(plot_dir, f"{prefix}{what}.png"), dpi=100)
        plt.close(fig)
    print("wrote " + ", ".join(os.path.join(plot_dir, f"{prefix}{what}.png") for what in figures))
