"""
The test-time scaling experiment: how a trained checkpoint does at every test-time r.

    python eval.py --out_dir=out-reasoning                              # accuracy by difficulty and r, a picture
    python eval.py --out_dir=out-shakespeare-char --r="[1,2,4,8,16,32,64]"
    python eval.py --out_dir=out-reasoning --problem 0123 --r="[1,4,32]"  # only your own problem, at each r

1. Val loss at every r, on the same fixed validation blocks and noise starts as train.py's evals (run on the device
   it trained on: a CUDA generator draws other numbers than a CPU one from the same seed).
2. For reasoning data (prepare_data.py reasoning / problems): exact-match accuracy by difficulty and r over the
   whole val split, printed, written to out_dir/accuracy.json and drawn in out_dir/accuracy.png (if matplotlib is
   installed; nothing else needs it), then the example problems prepare_data.py saved, answered at each r.
3. --quantize int8: the same with int8 weights, written beside the float results (accuracy_int8.json), and how often
   int8's top-1 prediction is float32's, beside how often float32's own is the same from another noise start
   (docs/decoding.md).
"""

import copy
import json
import os
import sys

import numpy as np
import torch

from checkpoints import get_tokenizer, load_checkpoint, quantize_checkpoint, trained_init_scale
from common import keyed_generator, pick_device, pyplot, set_threads, writable_dir
from configurator import configure, fail, number, one_of, steps, whole
from dataloader import checkpoint_data

# -----------------------------------------------------------------------------------------------------------
out_dir = "out"
r = []                # the r to evaluate; [] means 1, 2, 4, ... up to 8 r_bar
data_dir = ""         # "" means the data the checkpoint was trained on
problem = ""          # reasoning checkpoints: a problem of your own to answer at each r, e.g. --problem 0123
init_scale = None     # std of the noise start s_0 (0: the zero state); None: what the checkpoint trained with
plot = True           # draw out_dir/accuracy.png (needs matplotlib)
quantize = ""         # "int8": evaluate with int8 weights (linear_kernels.py) and say how often they agree with float32
calibration_tokens = 8192  # int8: GPTQ fits the weights on this many training tokens (0: rounded to nearest)
device = "cpu"
num_threads = 0       # CPU threads; 0: OMP_NUM_THREADS if set, else half the cores
config = configure(globals())
# -----------------------------------------------------------------------------------------------------------

steps(config, "r")
if init_scale is not None:
    number(config, "init_scale", low=0)
one_of(config, "quantize", ("", "int8"))
whole(config, 0, "calibration_tokens")
device = pick_device(device)
set_threads(num_threads)
model, checkpoint = load_checkpoint(out_dir, device)
writable_dir(out_dir)  # accuracy.json and the picture go there: checked before the work, not after
train_config, meta, r_bar = checkpoint["config"], checkpoint["meta"], model.config.mean_recurrence
r = sorted(set(r or [2**i for i in range(int(np.log2(8 * r_bar)) + 1)]))
block_size, batch_size, seed = train_config["block_size"], train_config["batch_size"], train_config["seed"]
init_scale = trained_init_scale(checkpoint) if init_scale is None else init_scale
data = checkpoint_data(checkpoint, data_dir)
encode, decode = get_tokenizer(meta)
reasoning = data.aligned and "examples" in data.meta  # problems (reasoning, problems), not chat rows
suffix = f"_{quantize}" if quantize else ""  # accuracy_int8.json beside the float results, not over them
if problem and not reasoning:
    fail(f"--problem is for checkpoints that answer problems (prepare_data.py reasoning or problems); {out_dir} "
         "continues text: python sample.py --out_dir=... --start=...")
if problem and len(encode("\n" + problem)) > block_size:
    fail(f"--problem has {len(problem)} characters; this checkpoint reads at most {block_size - 1} (block_size "
         f"{block_size}, with the leading newline)")
float_model = copy.deepcopy(model) if quantize else None  # kept to compare with, before quantizing in place
if quantize:
    quantize_checkpoint(model, checkpoint, calibration_tokens, data=data)


def noise(*key):
    """train.py's keyed generator: the same noise starts s_0 as its evals (on the same device), so the figures
    match its log."""
    return keyed_generator(seed, *key, device=device)


@torch.no_grad()
def logits_at(x, num_steps, key, of=None):
    return (of or model)(x.to(device), num_steps=num_steps, init_scale=init_scale, generator=noise(*key))[0].cpu()


def answer_at_each_r(examples):
    """(difficulty, problem, answer) triples, each answered at every r: the argmax after each of its characters,
    "\n" leading as in training."""
    for d, text, answer in examples:
        ids = torch.tensor([encode("\n" + text)[-block_size:]])  # they fit: val problems, or --problem (checked)
        print(f"{text}" + (f"  (difficulty {d}, answer {answer})" if answer else ""))
        for num_steps in r:
            predicted = decode(logits_at(ids, num_steps, (-4,))[0].argmax(-1).tolist())[-len(answer or text):]
            verdict = ("right" if predicted == answer else "wrong") if answer else ""
            print(f"  r={num_steps:<3} {predicted.replace(chr(10), '|')}  {verdict}")


if problem:  # your own problem, and nothing more: the val tables and the files that hold them stay as they are
    answer_at_each_r([(None, problem, "")])
    sys.exit()


# -----------------------------------------------------------------------------------------------------------
# 1. val loss by r, on train.py's fixed validation blocks

blocks = data.evenly_spaced("val", train_config["eval_iters"] * batch_size).split(batch_size)
print(f"{out_dir}: {(float_model or model).get_num_params() / 1e6:.2f}M parameters, trained {checkpoint['iter_num']} "
      f"iterations at r_bar {r_bar}; val loss on {len(blocks) * batch_size} fixed blocks of {block_size} tokens")
val_loss, agreement, noise_agreement = {}, {}, {}
for num_steps in r:
    losses, agree, noise_agree, positions = [], 0, 0, 0
    for i, b in enumerate(blocks):
        x, y = data.batch("val", b)
        logits = logits_at(x, num_steps, (-1, i))
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).item())
        if quantize:  # top-1 agreement with the float model, on the positions that carry a target
            top1 = logits_at(x, num_steps, (-1, i), of=float_model).argmax(-1)
            # the yardstick: float32 itself from another draw of the noise start s_0
            other = logits_at(x, num_steps, (-1, i, 1), of=float_model).argmax(-1)
            labelled = y >= 0
            agree += int((logits.argmax(-1) == top1)[labelled].sum())
            noise_agree += int((other == top1)[labelled].sum())
            positions += int(labelled.sum())
    val_loss[num_steps] = sum(losses) / len(losses)
    agreement[num_steps] = agree / max(positions, 1)
    noise_agreement[num_steps] = noise_agree / max(positions, 1)
print("  " + " ".join(f"{'r=' + str(n):>8}" for n in r))
print("  " + " ".join(f"{val_loss[n]:8.4f}" for n in r))
result = {"iter": checkpoint["iter_num"], "r": r, "r_bar": r_bar, "init_scale": init_scale, "data_dir": data.data_dir,
          "val_loss": {str(n): val_loss[n] for n in r}}
if quantize:
    rounding = f"GPTQ, calibration_tokens={calibration_tokens}" if calibration_tokens else "rounded to nearest"
    print(f"  {quantize} ({rounding}): top-1 agreement with float32 on the targets of those blocks")
    print("  " + " ".join(f"{agreement[n]:8.4f}" for n in r))
    print("  float32 against itself from another draw of the noise start s_0 (below 1: the noise decides some)")
    print("  " + " ".join(f"{noise_agreement[n]:8.4f}" for n in r))
    result["quantize"], result["agreement"] = quantize, {str(n): agreement[n] for n in r}
    result["calibration_tokens"] = calibration_tokens
    result["noise_agreement"] = {str(n): noise_agreement[n] for n in r}

# -----------------------------------------------------------------------------------------------------------
# 2. reasoning data: exact-match accuracy by difficulty and r

if reasoning:
    # A problem is a maximal run of labelled positions of one difficulty inside a row; it is solved when the
    # argmax prediction is right at every one of its positions (the targets are aligned: prepare_data.py)
    n_rows = data.num_blocks("val")
    targets, difficulty, labelled, first = data.val_problems()  # (rows, T) each
    problem_of = torch.from_numpy(np.cumsum(first.reshape(-1)).reshape(n_rows, block_size) - 1)  # (rows, T)
    problem_difficulty = difficulty[first]  # (problems,)
    n_problems = len(problem_difficulty)
    if n_problems == 0:
        fail("val_targets.bin has no labelled positions; nothing to score")
    solved = {}
    for num_steps in r:
        wrong = torch.zeros(n_problems, dtype=torch.int64)  # wrong positions per problem
        for i, rows in enumerate(torch.arange(n_rows).split(batch_size)):
            x, y = data.batch("val", rows)
            miss = (logits_at(x, num_steps, (-3, i)).argmax(-1) != y) & (y >= 0)  # (B, T)
            wrong += torch.bincount(problem_of[rows][miss], minlength=n_problems)
        solved[num_steps] = (wrong == 0).numpy()
    result["problems"], result["accuracy"] = {}, {}
    for d in sorted(set(problem_difficulty.tolist())) + ["all"]:
        mask = problem_difficulty == d if d != "all" else np.ones(n_problems, dtype=bool)
        result["problems"][str(d)] = int(mask.sum())
        result["accuracy"][str(d)] = {str(n): float(solved[n][mask].mean()) for n in r}
    print(f"\nexact-match accuracy on {n_problems:,} val problems, by difficulty (rows) and r (columns)")
    print(f"{'difficulty':>10} {'problems':>8} " + " ".join(f"{'r=' + str(n):>6}" for n in r))
    for d, accuracy in result["accuracy"].items():
        print(f"{d:>10} {result['problems'][d]:>8} " + " ".join(f"{accuracy[str(n)]:6.3f}" for n in r))

    print()  # the example problems prepare_data.py saved
    answer_at_each_r(meta.get("examples", []))

    plt = pyplot("no picture: pip install matplotlib to draw accuracy.png") if plot else None
    if plt:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        difficulties = [d for d in result["accuracy"] if d != "all"]
        trained = meta.get("train_max_difficulty")
        colors = plt.cm.viridis(np.linspace(0, 1, len(difficulties)))
        for d, color in zip(difficulties, colors):
            beyond = trained is not None and int(d) > trained
            ax.plot(r, [result["accuracy"][d][str(n)] for n in r], marker="o", markersize=3, color=color,
                    linestyle="--" if beyond else "-", label=d + (" (beyond training)" if beyond else ""))
        ax.plot(r, [result["accuracy"]["all"][str(n)] for n in r], color="black", linewidth=2.5, label="all")
        ax.axvline(r_bar, color="gray", linestyle=":", label=f"r_bar = {r_bar}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(r, [str(n) for n in r])
        ax.set(xlabel="test-time r (steps of the core)", ylabel="exact-match accuracy", ylim=(-0.02, 1.02),
               title=f"accuracy by difficulty and r (iteration {result['iter']})")
        ax.grid(alpha=0.3)
        ax.legend(title="difficulty", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"accuracy{suffix}.png"))
        print(f"wrote {os.path.join(out_dir, f'accuracy{suffix}.png')}")

with open(os.path.join(out_dir, ("accuracy" if "accuracy" in result else "eval") + suffix + ".json"), "w") as f:
    json.dump(result, f, indent=1)
