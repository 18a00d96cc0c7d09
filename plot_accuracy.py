"""
Optional: draw the accuracy-by-depth table that train.py writes for reasoning data (out_dir/accuracy.json)
as a PNG, one line per difficulty. Needs matplotlib, which nothing else in this project does:

    pip install matplotlib
    python plot_accuracy.py out-reasoning/accuracy.json assets/reasoning_accuracy.png 8

The optional last number is the hardest difficulty trained on; harder ones are drawn dashed.
"""

import json
import os
import sys

from configurator import fail

if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and not sys.argv[3].isdigit()):
    fail("usage: python plot_accuracy.py out_dir/accuracy.json picture.png [hardest trained difficulty]")
src, dst = sys.argv[1:3]
trained = int(sys.argv[3]) if len(sys.argv) == 4 else None
if not os.path.isfile(src):
    fail(f"{src} not found; train on reasoning data first (it is written at the end of train.py, or by --eval_only)")
with open(src) as f:
    result = json.load(f)
try:
    import matplotlib
except ImportError:
    fail("plotting needs matplotlib: pip install matplotlib")
matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt

depths = result["depths"]
difficulties = [d for d in result["accuracy"] if d != "all"]
fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
colors = plt.cm.viridis([i / max(1, len(difficulties) - 1) for i in range(len(difficulties))])
for d, color in zip(difficulties, colors):
    beyond = trained is not None and int(d) > trained
    ax.plot(depths, [result["accuracy"][d][str(r)] for r in depths], marker="o", markersize=3, color=color,
            linestyle="--" if beyond else "-", label=f"{d}" + (" (beyond training)" if beyond else ""))
ax.plot(depths, [result["accuracy"]["all"][str(r)] for r in depths], color="black", linewidth=2.5, label="all")
config_path = os.path.join(os.path.dirname(src), "config.json")  # train.py's settings, written beside it
if os.path.isfile(config_path):
    with open(config_path) as f:
        r_bar = json.load(f)["mean_recurrence"]
    ax.axvline(r_bar, color="gray", linestyle=":", label=f"r_bar = {r_bar}")
ax.set_xscale("log", base=2)
ax.set_xticks(depths, [str(r) for r in depths])
ax.set_xlabel("test-time depth r (iterations of the core)")
ax.set_ylabel("exact-match accuracy")
ax.set_ylim(-0.02, 1.02)
ax.set_title(f"accuracy by difficulty and depth (iteration {result['iter']})")
ax.grid(alpha=0.3)
ax.legend(title="difficulty", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
fig.tight_layout()
os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
fig.savefig(dst)
print(f"wrote {dst}")
