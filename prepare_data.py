"""
Turn a dataset into the token files train.py reads:

    python prepare_data.py shakespeare_char                       # characters as tokens (downloads 1 MB)
    python prepare_data.py shakespeare                            # GPT-2 BPE (tiktoken r50k_base)
    python prepare_data.py shakespeare_char --input=path/to/input.txt   # a local text file instead
    python prepare_data.py reasoning                              # a generated state-tracking task (below)
    python prepare_data.py problems --input=my_problems.txt       # your own problems, same format

Writes data/<dataset>/ next to this file (or --out_dir):
    train.bin, val.bin   the token ids as one uint16 stream each (np.uint16, tofile)
    meta.json            how to decode them: {"tokenizer": "char", "vocab_size": V, "chars": ...}
                         or {"tokenizer": "r50k_base", "vocab_size": 50257}
reasoning and problems also write (targets aligned with the inputs, for exact-match accuracy by difficulty):
    train_targets.bin, val_targets.bin   the label AT each position (65535: no loss there), same length as the tokens
    val_difficulty.bin   the difficulty of the problem each labelled position belongs to (0 elsewhere)
    meta.json            adds "row_len": the streams are whole rows of that many tokens (train with that block_size)
Each dataset has one function below; the dispatch at the bottom picks it. The output depends only on the
input text (and the seed, for generated datasets), so running it twice gives the same bytes.
"""

import json
import os
import sys
import urllib.request

import numpy as np

from configurator import configure, fail

# -----------------------------------------------------------------------------------------------------------
# settings (the dataset name is the first argument; everything else is --key=value)
input = ""          # a local text file to use instead of downloading the source
out_dir = ""        # where the files go; "" means data/<dataset> next to this script
val_fraction = 0.1  # the last 10% of the text is the validation split
seed = 1337         # for generated datasets
# reasoning / problems (aligned targets)
train_max_difficulty = 8       # harder problems go to val only: the test beyond the training range
num_train_problems = 200_000   # reasoning: problems in train.bin (difficulties 1..train_max_difficulty)
val_problems_per_difficulty = 100  # reasoning: problems per difficulty in val.bin
row_len = 0                    # tokens per row; 0 means the longest problem + 1
# -----------------------------------------------------------------------------------------------------------

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_text(url):
    """The source text: --input if given, else a download (kept as input.txt so it happens once)."""
    path = input
    if not path:
        path = os.path.join(out_dir, "input.txt")
        if not os.path.isfile(path):
            print(f"downloading {url}")
            os.makedirs(out_dir, exist_ok=True)
            try:
                data = urllib.request.urlopen(url, timeout=60).read()
            except OSError as e:  # no network, DNS, HTTP error: say what to do instead of a traceback
                fail(f"could not download {url} ({e}); download it yourself and pass --input=FILE")
            with open(path, "wb") as f:
                f.write(data)
    if not os.path.isfile(path):
        fail(f"input file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text:
        fail(f"input file {path!r} is empty; give a text file with some content")
    return text


def split_text(text):
    """The first (1 - val_fraction) of the characters train, the rest validate (nanoGPT's split)."""
    n = int(len(text) * (1 - val_fraction))
    if n == 0 or n == len(text):
        fail(f"the input ({len(text)} characters) is too short to split into train and val")
    return text[:n], text[n:]


def write_split(name, ids, vocab_size):
    """One token stream as uint16; ids must fit (train.py reads them back with the same dtype)."""
    if vocab_size > 2**16:
        fail(f"vocabulary of {vocab_size} tokens does not fit in uint16 (at most 65536); use a smaller tokenizer")
    ids = np.array(ids, dtype=np.uint16)
    ids.tofile(os.path.join(out_dir, f"{name}.bin"))
    print(f"{name}.bin: {len(ids):,} tokens")


def write_meta(meta):
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir} (vocab size {meta['vocab_size']:,})")


# -----------------------------------------------------------------------------------------------------------
# one function per dataset


def prepare_shakespeare_char():
    """Every distinct character is a token, ids in sorted order (tiny shakespeare: 65 of them)."""
    text = read_text(SHAKESPEARE_URL)
    chars = "".join(sorted(set(text)))
    stoi = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text(text)
    write_split("train", [stoi[c] for c in train_text], len(chars))  # tiny shakespeare: 1,003,854 tokens
    write_split("val", [stoi[c] for c in val_text], len(chars))      # 111,540 tokens
    write_meta({"tokenizer": "char", "vocab_size": len(chars), "chars": chars})


def prepare_shakespeare():
    """GPT-2's BPE (tiktoken calls it r50k_base; the same 50,257 tokens as "gpt2"); ids < 50257 fit in uint16."""
    import tiktoken  # only this dataset needs it

    try:
        enc = tiktoken.get_encoding("r50k_base")  # downloads the vocabulary once, then reads tiktoken's cache
    except OSError as e:
        fail(f"tiktoken could not load r50k_base ({e.__class__.__name__}); connect once, or set TIKTOKEN_CACHE_DIR "
             "to a folder that holds its cached file")
    text = read_text(SHAKESPEARE_URL)
    train_text, val_text = split_text(text)
    write_split("train", enc.encode_ordinary(train_text), enc.n_vocab)  # tiny shakespeare: 301,966 tokens
    write_split("val", enc.encode_ordinary(val_text), enc.n_vocab)      # 36,059 tokens
    write_meta({"tokenizer": "r50k_base", "vocab_size": enc.n_vocab})


# -----------------------------------------------------------------------------------------------------------
# reasoning problems: targets aligned with the inputs, accuracy by difficulty
#
# A problem is (difficulty, problem, answer): three strings. The answer is never shown to the model; its
# characters are the labels of the LAST len(answer) characters of the problem, which the model must predict
# from the problem alone (with a causal model, each label sees only the problem up to its own position):
#     8   01543225   01303531    a label at every character (the running result after each step)
#     3   7+5*2=_    4           one label, at the placeholder "_" (chars you add where the answer goes)
# Each problem is written as "\n" + problem; problems are packed whole into rows of row_len tokens (padded with
# "\n"), so a batch of whole rows never cuts one. Only answer positions carry a loss.
#
# The built-in task ("reasoning") is the S3 word problem: three cups, and a sequence of moves, each one of the
# 6 ways to rearrange them (digits 0-5 below). After every move the model names the arrangement reached so far.
# Each move needs the arrangement before it, and the moves do not commute, so a problem of d moves is d
# sequential steps with no shortcut: the model needs more iterations of its core for longer problems.

# digit i is the move after which place j holds the cup that was at place MOVES[i][j]
MOVES = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def cups_problem(difficulty, rng):
    """(difficulty, moves, arrangements): `difficulty` random moves and the arrangement after each one."""
    moves = rng.integers(len(MOVES), size=difficulty)
    cups, answer = (0, 1, 2), ""
    for m in moves:
        cups = tuple(cups[j] for j in MOVES[m])
        answer += str(MOVES.index(cups))  # an arrangement of the cups is itself one of the 6 moves
    return difficulty, "".join(map(str, moves)), answer


def read_problems(path):
    """The user's problems: one per line, `difficulty<TAB>problem<TAB>answer`; blank lines and # comments skipped."""
    if not os.path.isfile(path):
        fail(f"problems file {path!r} not found; give --input=FILE (one per line: difficulty<TAB>problem<TAB>answer)")
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            where = f"{path} line {n}"
            if len(fields) != 3:
                fail(f"{where}: expected difficulty<TAB>problem<TAB>answer, got {len(fields)} tab-separated fields")
            difficulty, problem, answer = fields
            if not difficulty.strip().isdigit() or not 1 <= int(difficulty) < 2**16:
                fail(f"{where}: difficulty must be an integer from 1 to 65535, got {difficulty!r}")
            if not answer or len(answer) > len(problem):
                fail(f"{where}: the answer must have 1 to len(problem) characters (it labels the problem's last ones)")
            problems.append((int(difficulty), problem, answer))
    if not problems:
        fail(f"{path} holds no problems")
    return problems


def pack_rows(problems, length):
    """Tokens (as characters), targets (a character or None) and difficulties, packed into rows of `length`."""
    rows, row = [], []
    for difficulty, problem, answer in problems:
        cells = [("\n", None, 0)] + [(c, None, 0) for c in problem]
        for i, c in enumerate(answer, len(cells) - len(answer)):
            cells[i] = (cells[i][0], c, difficulty)  # the label sits on the input position it belongs to
        if len(row) + len(cells) > length:
            rows.append(row + [("\n", None, 0)] * (length - len(row)))
            row = []
        row += cells
    rows.append(row + [("\n", None, 0)] * (length - len(row)))
    return [cell for row in rows for cell in row]


def write_problems(train, val, meta_extra):
    """Both splits in the aligned-target format (module docstring), with a character vocabulary."""
    length = row_len or 1 + max(len(p) for _, p, _ in train + val)
    longest = max(len(p) for _, p, _ in train + val)
    if longest + 1 > length:
        fail(f"a problem of {longest} characters does not fit in row_len={length}; raise --row_len or shorten it")
    chars = "".join(sorted({"\n"} | {c for _, p, a in train + val for c in p + a}))
    stoi = {c: i for i, c in enumerate(chars)}
    for name, problems in (("train", train), ("val", val)):
        cells = pack_rows(problems, length)
        write_split(name, [stoi[c] for c, _, _ in cells], len(chars))
        targets = np.array([65535 if t is None else stoi[t] for _, t, _ in cells], dtype=np.uint16)
        targets.tofile(os.path.join(out_dir, f"{name}_targets.bin"))
        if name == "val":
            np.array([d for _, _, d in cells], dtype=np.uint16).tofile(os.path.join(out_dir, "val_difficulty.bin"))
    # one val problem of each of the five hardest difficulties: what sample.py answers when given no prompt
    examples = sorted({d: [d, p, a] for d, p, a in val}.values())[-5:]
    difficulties = sorted({d for d, _, _ in val})
    print(f"{len(train):,} train and {len(val):,} val problems, rows of {length}; val difficulties {difficulties}")
    write_meta({"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "row_len": length, "examples": examples,
                **meta_extra})


def prepare_reasoning():
    """Train on 1..train_max_difficulty moves; validate on each of those and on 1.5x, 2x, 3x, 4x as many."""
    rng = np.random.default_rng(seed)
    train = [cups_problem(int(d), rng) for d in rng.integers(1, train_max_difficulty + 1, size=num_train_problems)]
    beyond = [train_max_difficulty * f // 2 for f in (3, 4, 6, 8)]
    val = [cups_problem(d, rng) for d in list(range(1, train_max_difficulty + 1)) + beyond
           for _ in range(val_problems_per_difficulty)]
    rng.shuffle(val)  # mix the difficulties inside rows
    write_problems(train, val, {"train_max_difficulty": train_max_difficulty})


def prepare_problems():
    """The user's file: problems above train_max_difficulty, and a random val_fraction of the rest, validate."""
    if not input:
        fail("give your problems file with --input=FILE (one per line: difficulty<TAB>problem<TAB>answer)")
    problems = read_problems(input)
    rng = np.random.default_rng(seed)
    in_val = rng.random(len(problems)) < val_fraction
    train = [p for p, v in zip(problems, in_val) if not v and p[0] <= train_max_difficulty]
    val = [p for p, v in zip(problems, in_val) if v or p[0] > train_max_difficulty]
    if not train or not val:
        fail(f"{input}: {len(train)} train and {len(val)} val problems; both need some (check --train_max_difficulty)")
    rng.shuffle(train)
    write_problems(train, val, {"train_max_difficulty": train_max_difficulty})


# -----------------------------------------------------------------------------------------------------------
# which dataset, where to, then run it

DATASETS = ["shakespeare_char", "shakespeare", "reasoning", "problems"]
if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
    fail(f"name a dataset first, e.g. python prepare_data.py shakespeare_char (one of: {', '.join(DATASETS)})")
dataset = sys.argv[1]
if dataset not in DATASETS:
    fail(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
settings = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, bool, str)) and k != "dataset"}
globals().update(configure(settings, sys.argv[2:]))
out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
os.makedirs(out_dir, exist_ok=True)

if dataset == "shakespeare_char":
    prepare_shakespeare_char()
elif dataset == "shakespeare":
    prepare_shakespeare()
elif dataset == "reasoning":
    prepare_reasoning()
elif dataset == "problems":
    prepare_problems()
