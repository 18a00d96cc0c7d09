"""
Turn a dataset into the token files train.py reads:

    python prepare_data.py shakespeare_char                       # characters as tokens (downloads 1 MB)
    python prepare_data.py shakespeare                            # GPT-2 BPE (tiktoken r50k_base)
    python prepare_data.py shakespeare_char --input=path/to/input.txt   # a local text file instead
    python prepare_data.py reasoning                              # a generated state-tracking task (below)
    python prepare_data.py problems --input=my_problems.txt       # your own problems, same format
    python prepare_data.py fineweb_edu                            # a real pretraining corpus: ~2B tokens (3.5 GB)
    python prepare_data.py fineweb_edu --input=DIR                # from FineWeb-Edu parquet files already on disk

Writes data/<dataset>/ next to this file (or --out_dir):
    train.bin, val.bin   the token ids as one uint16 stream each (np.uint16, tofile)
    meta.json            how to decode them: {"tokenizer": "char", "vocab_size": V, "chars": ...}
                         or {"tokenizer": "r50k_base", "vocab_size": 50257}
reasoning and problems also write (targets aligned with the inputs, for exact-match accuracy by difficulty):
    train_targets.bin, val_targets.bin   the label AT each position (65535: no loss there), same length as the tokens
    val_difficulty.bin   the difficulty of the problem each labelled position belongs to (0 elsewhere)
    meta.json            adds "row_len": the streams are whole rows of that many tokens (train with that block_size)
fineweb_edu (needs pyarrow) is too big for one file; it writes token shards instead, each a uint16 stream:
    train_000000.bin, train_000001.bin, ...   one per parquet shard of the source, each document after <|endoftext|>
    val_000000.bin       from a source shard that never trains
    meta.json            {"tokenizer": "r50k_base", "vocab_size": 50257, "eot_token": 50256,
                          "shards": {"train_000000.bin": <tokens>, ..., "val_000000.bin": <tokens>},
                          "source": <URL or folder>, "parquet_files": {"train_000000.bin": <its parquet file>, ...}}
                         (written last; a shard's file size must be 2 * its tokens, else it was cut short)
Each dataset has one function below; the dispatch at the bottom picks it. The output depends only on the
input text (and the seed, for generated datasets), so running it twice gives the same bytes.
"""

import http.client
import json
import multiprocessing
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from common import format_seconds, read_text, writable_dir
from configurator import configure, fail, number, whole

# -----------------------------------------------------------------------------------------------------------
# settings (the dataset name is the first argument; everything else is --key=value)
input = ""          # a local text file to use instead of downloading the source (fineweb_edu: a folder of parquet)
out_dir = ""        # where the files go; "" means data/<dataset> next to this script
val_fraction = 0.1  # the last 10% of the text is the validation split
seed = 1337         # for generated datasets
# reasoning / problems (aligned targets)
train_max_difficulty = 8       # harder problems go to val only: the test beyond the training range
num_train_problems = 200_000   # reasoning: problems in train.bin (difficulties 1..train_max_difficulty)
val_problems_per_difficulty = 100  # reasoning: problems per difficulty in val.bin
row_len = 0                    # tokens per row; 0 means the longest problem + 1 (chat data: the longest example)
# fineweb_edu (see prepare_fineweb_edu for the release and these numbers)
num_shards = 36                # train shards to download, ~55M tokens each: ~2.0B tokens from ~3.5 GB of parquet
val_tokens = 10_000_000        # validation: whole row groups of the held-out shard until at least this many tokens
num_workers = 0                # tokenizer processes; 0 means one per CPU core
download_attempts = 5          # tries per file, with 1, 2, 4, 8 s waits between them
fineweb_url = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"  # + /shard_00000.parquet
# gsm8k and chat (question/answer pairs for fine-tuning the released model)
tokenizer = "huginn-0125"      # the release's tokenizer: huginn-0125 (downloaded once), its folder, or a tokenizer.json
gsm8k_url = "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main"  # + /train-00000-of-00001.parquet
# -----------------------------------------------------------------------------------------------------------

SETTINGS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
NO_LOSS = 65535  # the target that means "no loss here" (dataloader.NO_LOSS)
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def source_text(url):
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


def r50k_base():
    """GPT-2's BPE from tiktoken (only the BPE datasets need it)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("r50k_base")  # downloads the vocabulary once, then reads tiktoken's cache
    except OSError as e:
        fail(f"tiktoken could not load r50k_base ({e.__class__.__name__}); connect once, or set TIKTOKEN_CACHE_DIR "
             "to a folder that holds its cached file")


def prepare_shakespeare_char():
    """Every distinct character is a token, ids in sorted order (tiny shakespeare: 65 of them)."""
    text = source_text(SHAKESPEARE_URL)
    chars = "".join(sorted(set(text)))
    stoi = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text(text)
    write_split("train", [stoi[c] for c in train_text], len(chars))  # tiny shakespeare: 1,003,854 tokens
    write_split("val", [stoi[c] for c in val_text], len(chars))      # 111,540 tokens
    write_meta({"tokenizer": "char", "vocab_size": len(chars), "chars": chars})


def prepare_shakespeare():
    """GPT-2's BPE (tiktoken calls it r50k_base; the same 50,257 tokens as "gpt2"); ids < 50257 fit in uint16."""
    enc = r50k_base()
    text = source_text(SHAKESPEARE_URL)
    train_text, val_text = split_text(text)
    write_split("train", enc.encode_ordinary(train_text), enc.n_vocab)  # tiny shakespeare: 301,966 tokens
    write_split("val", enc.encode_ordinary(val_text), enc.n_vocab)      # 36,059 tokens
    write_meta({"tokenizer": "r50k_base", "vocab_size": enc.n_vocab})


# -----------------------------------------------------------------------------------------------------------
# FineWeb-Edu: a real pretraining corpus (educational web pages, English), sharded
#
# The release is karpathy/fineweb-edu-100b-shuffle: HuggingFaceFW/fineweb-edu's sample-100BT (~100B GPT-2 tokens)
# shuffled once and cut into 1,823 parquet files shard_00000.parquet ... shard_01822.parquet, each ~250M
# characters, ~90-100 MB on disk, ~53k documents, ~55M GPT-2 tokens, with a single column "text" in row groups of
# 1,024 documents. Why this one rather than the official sample/10BT files (2 GB each, 11 columns):
# - shuffled: the first N shards are a uniform sample of the whole, so any num_shards is a fair slice;
# - small shards: a lost connection or a crash costs one 100 MB file, and the size of the corpus can be chosen
#   in 55M-token steps;
# - only the text: nothing is downloaded that would be thrown away.
# The last shard never trains (num_shards stops below it) and gives the validation tokens.
#
# num_shards = 36 is ~2.0B train tokens: Chinchilla's ~20 tokens per parameter for the ~96M `small` preset, and
# a few hours on one GPU. A token costs that model ~1.3 GFLOP to train (36 blocks forward at r_bar = 8, backward
# through 20 of them, the 50k-word head), about 1.8x a GPT-2 124M token: at 40% of peak bf16, ~2 hours on an H100,
# ~6 on an A100 (an estimate, not measured). Disk: 37 x ~95 MB = 3.5 GB of parquet; ~4 GB of tokens (2 bytes each).

FINEWEB_LAST_SHARD = 1822  # shard_01822.parquet: validation
TEXT_COLUMN = "text"       # the documents; the official release names its column the same
EOT = 50256                # <|endoftext|> in r50k_base: before every document, as GPT-2 and nanoGPT do


def download(url, path):
    """Fetch url to path through path.part: resume the part with an HTTP Range request, retry with backoff, and
    rename the file into place only once complete, so a file under its final name is always whole."""
    part, reason = path + ".part", ""
    for attempt in range(1, download_attempts + 1):
        if attempt > 1:
            wait = 2 ** (attempt - 2)  # 1, 2, 4, 8 s
            print(f"  {reason}; trying again in {wait} s ({attempt}/{download_attempts})")
            time.sleep(wait)
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # the server ignored the Range: it sends the whole file
                    have = 0
                size = response.headers.get("Content-Length")
                total = have + int(size) if size is not None else None
                with open(part, "ab" if have else "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
            got = os.path.getsize(part)
            if total is not None and got != total:  # the connection ended early: the next try resumes from here
                reason = f"the connection closed after {got:,} of {total:,} bytes"
                continue
            os.replace(part, path)
            return
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if e.code == 416:  # our part is longer than the file: it is not the start of this file, start over
                os.remove(part)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                break  # not found, forbidden, ...: asking again will not help
        except (OSError, http.client.HTTPException) as e:  # no network, DNS, timeout, reset: worth another try
            reason = str(getattr(e, "reason", None) or e) or e.__class__.__name__
    fail(f"could not download {url} ({reason}); check the connection and run again (finished shards are kept), "
         "or download the parquet files yourself and pass --input=DIR")


def open_parquet(path):
    """A parquet file with a text column, or a one-line error that says what to do about it."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        fail(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); it may be truncated: "
             "delete it and run again")
    if TEXT_COLUMN not in parquet.schema_arrow.names:
        fail(f"{path} has no {TEXT_COLUMN!r} column (it has {', '.join(parquet.schema_arrow.names)}); "
             "FineWeb-Edu parquet files keep their documents there")
    return parquet


_worker = {}  # in each tokenizer process: the encoder, and the parquet file it read last


def tokenize_row_group(task):
    """(parquet path, row group) -> the group's documents as one uint16 array, each after <|endoftext|>.
    Runs in a worker process, which reads the row group itself: only the small token array travels back."""
    path, group = task
    if "enc" not in _worker:
        import tiktoken

        _worker["enc"] = tiktoken.get_encoding("r50k_base")
    if _worker.get("path") != path:
        import pyarrow.parquet as pq

        _worker["path"], _worker["parquet"] = path, pq.ParquetFile(path)
    texts = _worker["parquet"].read_row_group(group, columns=[TEXT_COLUMN]).column(0).to_pylist()
    docs = [_worker["enc"].encode_ordinary(text) for text in texts if text]  # empty documents are skipped
    tokens = np.empty(sum(len(doc) + 1 for doc in docs), dtype=np.uint16)  # ids < 50257 fit
    at = 0
    for doc in docs:
        tokens[at] = EOT
        tokens[at + 1: at + 1 + len(doc)] = doc
        at += 1 + len(doc)
    return tokens


def tokenize_parquet(pool, workers, parquet_path, name, max_tokens=None):
    """Tokenize one parquet file into out_dir/name (through name.tmp); with max_tokens, stop after the first row
    group that reaches it. Row groups go to the pool a few at a time, in order, so the output never depends on
    the number of processes and memory stays at a few row groups."""
    import pyarrow

    parquet = open_parquet(parquet_path)
    tmp, n = os.path.join(out_dir, name + ".tmp"), 0
    window = 4 * workers
    with open(tmp, "wb") as f:
        for start in range(0, parquet.num_row_groups, window):
            groups = range(start, min(start + window, parquet.num_row_groups))
            try:
                arrays = pool.map(tokenize_row_group, [(parquet_path, g) for g in groups])
            except (pyarrow.ArrowException, OSError) as e:  # a damaged page deep inside the file
                fail(f"could not read {parquet_path} ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
                     "it may be truncated or corrupt: delete it and run again")
            for tokens in arrays:
                if max_tokens is not None and n >= max_tokens:
                    break
                f.write(tokens.tobytes())
                n += len(tokens)
            if max_tokens is not None and n >= max_tokens:
                break
    if n == 0:
        fail(f"{parquet_path} holds no documents")
    os.replace(tmp, os.path.join(out_dir, name))  # only a finished shard gets its name
    return n


def prepare_fineweb_edu():
    """Download (or take from --input) the parquet files, tokenize each into its own shard, write meta.json last.
    A shard already written is skipped, so running the same command again resumes where it stopped."""
    try:
        import pyarrow.parquet  # noqa: F401  (only this dataset needs it)
    except ImportError:
        fail("fineweb_edu needs pyarrow to read parquet: pip install pyarrow")
    if input:  # the user's parquet files: the last by name validates, the others train, in name order
        if not os.path.isdir(input):
            fail(f"--input={input} is not a folder; give the folder that holds the FineWeb-Edu parquet files")
        files = sorted(os.path.join(input, f) for f in os.listdir(input) if f.endswith(".parquet"))
        if len(files) < 2:
            fail(f"{input} holds {len(files)} .parquet files; it needs at least 2 (the last by name validates)")
        sources = {"val_000000.bin": files[-1], **{f"train_{i:06d}.bin": p for i, p in enumerate(files[:-1])}}
        source = os.path.abspath(input)
    else:  # download num_shards train shards and the release's last shard into out_dir/parquet
        if not 1 <= num_shards <= FINEWEB_LAST_SHARD:
            fail(f"num_shards must be from 1 to {FINEWEB_LAST_SHARD} (shard_{FINEWEB_LAST_SHARD:05d} validates)")
        indices = {"val_000000.bin": FINEWEB_LAST_SHARD, **{f"train_{i:06d}.bin": i for i in range(num_shards)}}
        sources = {name: os.path.join(out_dir, "parquet", f"shard_{i:05d}.parquet") for name, i in indices.items()}
        source = fineweb_url
        os.makedirs(os.path.join(out_dir, "parquet"), exist_ok=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = num_workers or cores
    _worker["enc"] = r50k_base()  # load it (or fail) once here; forked workers inherit it
    shards, train_done, train_tokens, train_time = {}, 0, 0, 0.0
    print(f"{len(sources) - 1} train shards and 1 val shard from {source}; {workers} tokenizer processes")
    finished = [name for name in sources if os.path.isfile(os.path.join(out_dir, name))]
    if finished:
        print(f"{len(finished)} shards were written by an earlier run and are kept (delete one to make it again)")
    with multiprocessing.Pool(workers) as pool:
        for name, parquet_path in sources.items():  # val first: it is small, and a bad connection shows at once
            shard_path = os.path.join(out_dir, name)
            if os.path.isfile(shard_path):  # finished in an earlier run (a shard appears under its name whole)
                shards[name] = os.path.getsize(shard_path) // 2
                continue
            t0 = time.time()
            if not os.path.isfile(parquet_path):  # never with --input: those files were listed from disk
                url = f"{fineweb_url}/{os.path.basename(parquet_path)}"
                print(f"downloading {url}")
                download(url, parquet_path)
            shards[name] = tokenize_parquet(pool, workers, parquet_path, name,
                                            val_tokens if name.startswith("val") else None)
            line = f"{name}: {shards[name]:,} tokens | {len(shards)}/{len(sources)} shards done"
            if name.startswith("train"):  # rate and ETA from this run's train shards, downloads included
                train_done += 1
                train_tokens += shards[name]
                train_time += time.time() - t0
                line += (f", {sum(shards.values()):,} tokens | {train_tokens / train_time:,.0f} tokens/s | "
                         f"ETA {format_seconds(train_time / train_done * (len(sources) - len(shards)))}")
            print(line, flush=True)
    write_meta({"tokenizer": "r50k_base", "vocab_size": 50257, "eot_token": EOT, "shards": dict(sorted(shards.items())),
                "source": source, "parquet_files": {name: os.path.basename(sources[name]) for name in sorted(sources)}})
    print(f"{sum(n for name, n in shards.items() if name.startswith('train')):,} train tokens, "
          f"{shards['val_000000.bin']:,} val tokens")


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
        targets = np.array([NO_LOSS if t is None else stoi[t] for _, t, _ in cells], dtype=np.uint16)
        targets.tofile(os.path.join(out_dir, f"{name}_targets.bin"))
        if name == "val":
            np.array([d for _, _, d in cells], dtype=np.uint16).tofile(os.path.join(out_dir, "val_difficulty.bin"))
    # one val problem of each of the five hardest difficulties: what sample.py answers when given no prompt
    examples = sorted({d: [d, p, a] for d, p, a in val}.values())[-5:]
    difficulties = sorted({d for d, _, _ in val})
    print(f"{len(train):,} train and {len(val):,} val problems, rows of {length}; val difficulties {difficulties}")
    write_meta({"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "row_len": length, "examples": examples,
                **meta_extra})
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
# question/answer pairs for fine-tuning the released model (train.py --init_from=huginn-0125): each pair one row in
# the release's chat template, tokenized with its tokenizer, padded with <|pad|>. The loss is on the answer only:
# the target AT position t is token t + 1 where that token belongs to the answer, "no loss" elsewhere (the aligned
# format above, so train.py, eval.py and dataloader.py read it as they read reasoning data).

PROMPT = "<|begin_text|><|begin_header|>user<|end_header|>\n\n{}<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n"
ANSWER = "{}<|end_turn|>"


def released_tokenizer():
    """The release's tokenizer (a Hugging Face tokenizer.json, read by the tokenizers package) and its file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("the released tokenizer needs: pip install tokenizers")
    path = tokenizer
    if not path.endswith(".json"):
        from checkpoints import pretrained_folder  # huginn-0125: downloaded once (then cached) from the hub
        try:
            path = os.path.join(pretrained_folder(tokenizer), "tokenizer.json")
        except (ImportError, OSError) as err:
            fail(f"--tokenizer={tokenizer}: {err}")
    if not os.path.isfile(path):
        fail(f"--tokenizer: no tokenizer.json at {path}; give the released model's folder or its tokenizer.json")
    return Tokenizer.from_file(path), path


def write_chat(train, val, source):
    """(question, answer) pairs -> rows of row_len tokens; a pair longer than a row is skipped and counted."""
    tok, path = released_tokenizer()
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # the template's tokens are read as ids
    pad = tok.token_to_id("<|pad|>")
    pairs = {name: [(encode(PROMPT.format(q)), encode(ANSWER.format(a))) for q, a in split]
             for name, split in (("train", train), ("val", val))}
    length = row_len or max(len(p) + len(a) for split in pairs.values() for p, a in split)
    skipped = {}
    for name, split in pairs.items():
        tokens, targets = [], []
        for prompt, answer in split:
            ids = prompt + answer
            if NO_LOSS in answer:
                fail(f"an answer holds token {NO_LOSS}, which the target files keep for 'no loss'")
            if len(ids) > length:  # never cut: a cut answer would teach the model to stop mid-answer
                skipped[name] = skipped.get(name, 0) + 1
                continue
            # the target at t is token t + 1 if that one is part of the answer
            targets += [ids[t + 1] if t + 1 >= len(prompt) else NO_LOSS for t in range(len(ids) - 1)]
            targets += [NO_LOSS] * (length - len(ids) + 1)
            tokens += ids + [pad] * (length - len(ids))
        if skipped.get(name):
            print(f"{name}: skipped {skipped[name]} of {len(split)} pairs longer than row_len={length} tokens")
        if not tokens:
            fail(f"no {name} pair fits in row_len={length} tokens; raise --row_len")
        write_split(name, tokens, tok.get_vocab_size())
        np.array(targets, dtype=np.uint16).tofile(os.path.join(out_dir, f"{name}_targets.bin"))
    shutil.copy(path, os.path.join(out_dir, "tokenizer.json"))  # the checkpoint's tokenizer travels with its data
    write_meta({"tokenizer": "huginn", "vocab_size": tok.get_vocab_size(), "row_len": length,
                "folder": os.path.abspath(out_dir), "skipped": skipped, "source": source})


def prepare_gsm8k():
    """GSM8K (openai/gsm8k, its "main" config as parquet): 7,473 train and 1,319 test pairs; the test split
    validates. --input=DIR reads train*.parquet and test*.parquet from a folder instead of downloading."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail("gsm8k needs pyarrow to read parquet: pip install pyarrow")
    files = {}
    for split in ("train", "test"):
        if input:
            found = sorted(f for f in os.listdir(input) if f.startswith(split) and f.endswith(".parquet")) \
                if os.path.isdir(input) else []
            if not found:
                fail(f"--input={input} holds no {split}*.parquet (GSM8K's main/{split}-00000-of-00001.parquet)")
            files[split] = os.path.join(input, found[0])
        else:
            files[split] = os.path.join(out_dir, "parquet", f"{split}-00000-of-00001.parquet")
            if not os.path.isfile(files[split]):
                os.makedirs(os.path.dirname(files[split]), exist_ok=True)
                download(f"{gsm8k_url}/{split}-00000-of-00001.parquet", files[split])
    splits = {}
    for split, path in files.items():
        table = pq.read_table(path)
        if not {"question", "answer"} <= set(table.column_names):
            fail(f"{path} has no question and answer columns (it has {', '.join(table.column_names)})")
        splits[split] = list(zip(table.column("question").to_pylist(), table.column("answer").to_pylist()))
    write_chat(splits["train"], splits["test"], os.path.abspath(input) if input else gsm8k_url)


def prepare_chat():
    """Your own question/answer pairs: --input=FILE, one JSON object per line with "question" and "answer"; a
    random val_fraction of them validates."""
    if not input:
        fail('give your pairs with --input=FILE (one JSON object per line: {"question": ..., "answer": ...})')
    pairs = []
    for n, line in enumerate(read_text(input, "--input").split("\n"), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            pairs.append((str(pair["question"]), str(pair["answer"])))
        except (ValueError, KeyError, TypeError):
            fail(f'{input} line {n}: expected {{"question": ..., "answer": ...}}, got {line[:60]!r}')
    in_val = np.random.default_rng(seed).random(len(pairs)) < val_fraction
    train = [p for p, v in zip(pairs, in_val) if not v]
    val = [p for p, v in zip(pairs, in_val) if v]
    if not train or not val:
        fail(f"{input}: {len(train)} train and {len(val)} val pairs; both need some (check --val_fraction)")
    write_chat(train, val, os.path.abspath(input))


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
    if train_max_difficulty * 4 >= 2**16:
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
    elif dataset == "fineweb_edu":
        prepare_fineweb_edu()
    elif dataset == "gsm8k":
        prepare_gsm8k()
    elif dataset == "chat":
        prepare_chat()
