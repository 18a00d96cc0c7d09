"""
Turn a dataset into the token files train.py reads:

    python prepare_data.py shakespeare_char                       # characters as tokens (downloads 1 MB)
    python prepare_data.py shakespeare                            # GPT-2 BPE (tiktoken r50k_base)
    python prepare_data.py shakespeare_char --input=path/to/input.txt   # a local text file instead
    python prepare_data.py reasoning                              # a generated state-tracking task (below)
    python prepare_data.py problems --input=my_problems.txt       # your own problems, same format
    python prepare_data.py fineweb_edu                            # a real pretraining corpus: ~2B tokens (3.5 GB)
    python prepare_data.py fineweb_edu --input=DIR                # from FineWeb-Edu parquet files already on disk
    python prepare_data.py gsm8k --row_len=512                    # GSM8K for fine-tuning the release (corpora.py)
    python prepare_data.py chat --input=pairs.jsonl               # your own question/answer pairs, the same way

Writes data/<dataset>/ next to this file (or --out_dir):
    train.bin, val.bin   the token ids as one uint16 stream each (np.uint16, tofile)
    meta.json            how to decode them: {"tokenizer": "char", "vocab_size": V, "chars": ...}
                         or {"tokenizer": "r50k_base", "vocab_size": 50257}
reasoning and problems also write (targets aligned with the inputs, for exact-match accuracy by difficulty):
    train_targets.bin, val_targets.bin   the label AT each position (65535: no loss there), same length as the tokens
    val_difficulty.bin   the difficulty of the problem each labelled position belongs to (0 elsewhere)
    meta.json            adds "row_len": the streams are whole rows of that many tokens (train with that block_size)
    harness/             two lm-eval tasks on the val problems (harness.py --include_path=data/<dataset>/harness)
gsm8k and chat write the same aligned format in the release's tokenizer (corpora.py): one pair per row, the loss
on the answer only; meta.json names the tokenizer ("huginn") and the folder with its tokenizer.json.
fineweb_edu (needs pyarrow) is too big for one file; it writes token shards instead, each a uint16 stream:
    train_000000.bin, train_000001.bin, ...   one per parquet shard of the source, each document after <|endoftext|>
    val_000000.bin       from a source shard that never trains
    meta.json            {"tokenizer": "r50k_base", "vocab_size": 50257, "eot_token": 50256,
                          "shards": {"train_000000.bin": <tokens>, ..., "val_000000.bin": <tokens>},
                          "source": <URL or folder>, "parquet_files": {"train_000000.bin": <its parquet file>, ...}}
                         (written last; a shard's file size must be 2 * its tokens, else it was cut short)
Each dataset has one function, here or in corpora.py; the dispatch at the bottom picks it. The output depends only on
the input text (and the seed, for generated datasets), so running it twice gives the same bytes.
"""

import json
import os
import sys
from types import SimpleNamespace

import numpy as np

from common import read_text, writable_dir
from configurator import configure, fail, number, whole
from corpora import NO_LOSS, download, prepare_chat, prepare_fineweb_edu, prepare_gsm8k, r50k_base, write_meta, write_split

# -----------------------------------------------------------------------------------------------------------
# settings (the dataset name is the first argument; everything else is --key=value)
input = ""          # a local text file to use instead of downloading the source (fineweb_edu: a folder of parquet)
out_dir = ""        # where the files go; "" means data/<dataset> next to this script
val_fraction = 0.1  # the validation split: the last 10% of a text, a random 10% of problems or pairs
seed = 1337         # for generated datasets
download_attempts = 5  # tries per downloaded file, with 1, 2, 4, 8 s waits between them
# shakespeare(_char): the text, downloaded once unless --input is given
shakespeare_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# reasoning / problems (aligned targets)
train_max_difficulty = 8       # harder problems go to val only: the test beyond the training range
num_train_problems = 200_000   # reasoning: problems in train.bin (difficulties 1..train_max_difficulty)
val_problems_per_difficulty = 100  # reasoning: problems per difficulty in val.bin
row_len = 0                    # tokens per row; 0 means the longest problem + 1 (chat data: the longest example)
# fineweb_edu (see prepare_fineweb_edu for the release and these numbers)
num_shards = 36                # train shards to download, ~55M tokens each: ~2.0B tokens from ~3.5 GB of parquet
val_tokens = 10_000_000        # validation: whole row groups of the held-out shard until at least this many tokens
num_workers = 0                # tokenizer processes; 0 means one per CPU core
fineweb_url = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"  # + /shard_00000.parquet
# gsm8k and chat (question/answer pairs for fine-tuning the released model)
tokenizer = "huginn-0125"      # the release's tokenizer: huginn-0125 (downloaded once), its folder, or a tokenizer.json
gsm8k_url = "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main"  # + /train-00000-of-00001.parquet
# -----------------------------------------------------------------------------------------------------------

SETTINGS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def source_text(url):
    """The source text: --input if given, else a download (kept as input.txt, so it happens once per url)."""
    path = input
    if not path:
        path = os.path.join(out_dir, "input.txt")
        download(SimpleNamespace(download_attempts=download_attempts), url, path,
                 instead="download it yourself and pass --input=FILE")
    text = read_text(path, "--input")
    if not text:
        fail(f"input file {path!r} is empty; give a text file with some content")
    return text


def split_text(text):
    """The first (1 - val_fraction) of the characters train, the rest validate (nanoGPT's split)."""
    n = int(len(text) * (1 - val_fraction))
    if n == 0 or n == len(text):
        fail(f"--val_fraction={val_fraction} of {len(text)} characters leaves one split empty; give more text or "
             "another --val_fraction")
    return text[:n], text[n:]


# -----------------------------------------------------------------------------------------------------------
# one function per dataset


def prepare_shakespeare_char():
    """Every distinct character is a token, ids in sorted order (tiny shakespeare: 65 of them)."""
    text = source_text(shakespeare_url)
    chars = "".join(sorted(set(text)))
    stoi = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text(text)
    write_split(out_dir, "train", [stoi[c] for c in train_text], len(chars))  # tiny shakespeare: 1,003,854 tokens
    write_split(out_dir, "val", [stoi[c] for c in val_text], len(chars))      # 111,540 tokens
    write_meta(out_dir, {"tokenizer": "char", "vocab_size": len(chars), "chars": chars})


def prepare_shakespeare():
    """GPT-2's BPE (tiktoken calls it r50k_base; the same 50,257 tokens as "gpt2"); ids < 50257 fit in uint16."""
    enc = r50k_base()
    text = source_text(shakespeare_url)
    train_text, val_text = split_text(text)
    write_split(out_dir, "train", enc.encode_ordinary(train_text), enc.n_vocab)  # tiny shakespeare: 301,966 tokens
    write_split(out_dir, "val", enc.encode_ordinary(val_text), enc.n_vocab)      # 36,059 tokens
    write_meta(out_dir, {"tokenizer": "r50k_base", "vocab_size": enc.n_vocab})


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
    problems = []
    for n, line in enumerate(read_text(path, "--input").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        where = f"{path} line {n}"
        if len(fields) != 3:
            fail(f"{where}: expected difficulty<TAB>problem<TAB>answer, got {len(fields)} tab-separated fields")
        difficulty, problem, answer = fields
        if not difficulty.strip().isdecimal() or not 1 <= int(difficulty) < 2**16:  # (isdigit takes "²")
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
    if len(chars) > NO_LOSS:  # ids are uint16 and the last one marks "no loss"
        fail(f"the problems use {len(chars):,} distinct characters; at most {NO_LOSS:,} fit")
    stoi = {c: i for i, c in enumerate(chars)}
    for name, problems in (("train", train), ("val", val)):
        cells = pack_rows(problems, length)
        write_split(out_dir, name, [stoi[c] for c, _, _ in cells], len(chars))
        targets = np.array([NO_LOSS if t is None else stoi[t] for _, t, _ in cells], dtype=np.uint16)
        targets.tofile(os.path.join(out_dir, f"{name}_targets.bin"))
        if name == "val":
            np.array([d for _, _, d in cells], dtype=np.uint16).tofile(os.path.join(out_dir, "val_difficulty.bin"))
    # one val problem of each of the five hardest difficulties: eval.py answers them at each r, latents.py looks inside
    examples = sorted({d: [d, p, a] for d, p, a in val}.values())[-5:]
    difficulties = sorted({d for d, _, _ in val})
    print(f"{len(train):,} train and {len(val):,} val problems, rows of {length}; val difficulties {difficulties}")
    write_meta(out_dir, {"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "row_len": length,
                         "examples": examples, **meta_extra})
    write_harness_tasks(val)


def write_harness_tasks(val):
    """The val problems as two lm-eval tasks in out_dir/harness/ (harness.py --include_path=that folder): <dataset>
    asks for the answer at a problem's last position (generate one token: the final arrangement, for three cups);
    <dataset>_choice scores each possible answer by its log-likelihood there. Every prefix of a problem is a problem
    of its own, so the whole problem is the hardest question its row holds."""
    folder = os.path.join(out_dir, "harness")
    os.makedirs(folder, exist_ok=True)
    choices = sorted({a[-1] for _, _, a in val})
    docs = os.path.abspath(os.path.join(folder, f"{dataset}.jsonl"))
    with open(docs, "w") as f:
        for d, p, a in val:
            f.write(json.dumps({"prompt": "\n" + p, "answer": a[-1], "label": choices.index(a[-1]),
                                "difficulty": d}) + "\n")
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": docs}}, "test_split": "test",
              "doc_to_text": "{{prompt}}", "target_delimiter": "", "fewshot_delimiter": "\n"}
    tasks = {dataset: {**common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
                       "generation_kwargs": {"until": ["\n"], "max_gen_toks": 1, "do_sample": False},
                       "metric_list": [{"metric": "exact_match"}]},
             f"{dataset}_choice": {**common, "output_type": "multiple_choice", "doc_to_choice": choices,
                                   "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}}
    for name, task in tasks.items():  # JSON is YAML, so no YAML writer is needed
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            json.dump({"task": name, **task}, f, indent=1)
    print(f"wrote {folder}: lm-eval tasks {', '.join(tasks)} on {len(val):,} val problems")


def prepare_reasoning():
    """Train on 1..train_max_difficulty moves; validate on each of those and on 1.5x, 2x, 3x, 4x as many."""
    rng = np.random.default_rng(seed)
    train = [cups_problem(int(d), rng) for d in rng.integers(1, train_max_difficulty + 1, size=num_train_problems)]
    beyond = sorted({train_max_difficulty * f // 2 for f in (3, 4, 6, 8)} - set(range(1, train_max_difficulty + 1)))
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

DATASETS = ["shakespeare_char", "shakespeare", "reasoning", "problems", "fineweb_edu", "gsm8k", "chat"]
if __name__ == "__main__":  # not when fineweb_edu's tokenizer processes import this file
    if len(sys.argv) < 2 or sys.argv[1].startswith("--"):
        fail(f"name a dataset first, e.g. python prepare_data.py shakespeare_char (one of: {', '.join(DATASETS)})")
    dataset = sys.argv[1]
    if dataset not in DATASETS:
        fail(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    config = configure(SETTINGS, sys.argv[2:])
    globals().update(config)
    number(config, "val_fraction", low=0, below=1)
    whole(config, 1, "train_max_difficulty", "num_train_problems", "val_problems_per_difficulty", "val_tokens",
          "download_attempts")
    whole(config, 0, "row_len", "num_workers", "seed")
    if dataset == "reasoning" and train_max_difficulty * 4 >= 2**16:
        fail(f"--train_max_difficulty={train_max_difficulty}: the val split goes to 4x it, which must stay below 65536")
    if input and dataset == "reasoning":
        fail("reasoning is generated from --seed and reads no --input; for your own problems: prepare_data.py problems")
    out_dir = writable_dir(out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset))

    if dataset == "shakespeare_char":
        prepare_shakespeare_char()
    elif dataset == "shakespeare":
        prepare_shakespeare()
    elif dataset == "reasoning":
        prepare_reasoning()
    elif dataset == "problems":
        prepare_problems()
    elif dataset in ("fineweb_edu", "gsm8k", "chat"):  # corpora.py: parquet, the released tokenizer
        settings = SimpleNamespace(**{**config, "out_dir": out_dir})
        {"fineweb_edu": prepare_fineweb_edu, "gsm8k": prepare_gsm8k, "chat": prepare_chat}[dataset](settings)
