"""
The datasets of prepare_data.py that come as parquet or need the released tokenizer: FineWeb-Edu (pretraining, token
shards) and question/answer pairs for fine-tuning the release (GSM8K, your own). Each prepare_* function takes the
settings of prepare_data.py as c (c.out_dir, c.input, ...); prepare_data.py's docstring has the formats.
"""

import http.client
import json
import multiprocessing
import os
import shutil
import time
import urllib.error
import urllib.request

import numpy as np

from common import chat_text, format_seconds, read_text
from configurator import fail

NO_LOSS = 65535  # the target that means "no loss here" (dataloader.NO_LOSS)


def write_split(out_dir, name, ids, vocab_size):
    """One token stream as uint16; ids must fit (train.py reads them back with the same dtype)."""
    if vocab_size > 2**16:
        fail(f"vocabulary of {vocab_size} tokens does not fit in uint16 (at most 65536); use a smaller tokenizer")
    ids = np.array(ids, dtype=np.uint16)
    if os.path.isfile(os.path.join(out_dir, "meta.json")):  # it describes the old files: a rerun that stops before
        os.remove(os.path.join(out_dir, "meta.json"))       # writing its own must not leave it over new ones
    ids.tofile(os.path.join(out_dir, f"{name}.bin"))
    print(f"{name}.bin: {len(ids):,} tokens")


def write_meta(out_dir, meta):
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out_dir} (vocab size {meta['vocab_size']:,})")


def r50k_base():
    """GPT-2's BPE from tiktoken (only the BPE datasets need it)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("r50k_base")  # downloads the vocabulary once, then reads tiktoken's cache
    except OSError as e:
        fail(f"tiktoken could not load r50k_base ({e.__class__.__name__}); connect once, or set TIKTOKEN_CACHE_DIR "
             "to a folder that holds its cached file")


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
# a few hours on one GPU. A token costs that model ~1.64 GFLOP to train (estimate_flops_per_token, E[r] = 9): at 40%
# of peak bf16, ~2.3 hours on an H100 (an estimate, not measured; docs/training.md). Disk: 37 x ~95 MB = 3.5 GB of
# parquet; ~4 GB of tokens (2 bytes each).

FINEWEB_LAST_SHARD = 1822  # shard_01822.parquet: validation
TEXT_COLUMN = "text"       # the documents; the official release names its column the same
EOT = 50256                # <|endoftext|> in r50k_base: before every document, as GPT-2 and nanoGPT do


def download(c, url, path, instead="download the parquet files yourself and pass --input=DIR"):
    """Fetch url to path through path.part: resume the part with an HTTP Range request, retry with backoff, and
    rename the file into place only once complete, so a file under its final name is always whole. path.source
    names the url it came from: a file from this url is not fetched again, one (or a part) from another url is
    deleted first; one with no record (an earlier version's download) is taken as this url's. `instead`: what the
    user can do when it fails."""
    part, source, reason = path + ".part", path + ".source", ""
    came_from = url  # a file with no record: an earlier version's download
    if os.path.isfile(source):
        with open(source) as f:
            came_from = f.read()
    for stale in (path, part) if came_from != url else ():  # so a failed download leaves none of it behind
        if os.path.exists(stale):
            os.remove(stale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(source, "w") as f:
        f.write(url)
    if os.path.isfile(path):  # downloaded before
        return
    print(f"downloading {url}")
    for attempt in range(1, c.download_attempts + 1):
        if attempt > 1:
            wait = 2 ** (attempt - 2)  # 1, 2, 4, 8 s
            print(f"  {reason}; trying again in {wait} s ({attempt}/{c.download_attempts})")
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
            if e.code == 416 and e.headers.get("Content-Range") == f"bytes */{have}":  # the part is the whole file
                os.replace(part, path)  # (a run stopped between its last byte and the rename)
                return
            if e.code == 416:  # our part is longer than the file: it is not the start of this file, start over
                os.remove(part)
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                break  # not found, forbidden, ...: asking again will not help
        except (OSError, http.client.HTTPException) as e:  # no network, DNS, timeout, reset: worth another try
            reason = str(getattr(e, "reason", None) or e) or e.__class__.__name__
    fail(f"could not download {url} ({reason}); check the connection and run again (what is finished is kept), "
         f"or {instead}")


def open_parquet(path, columns=(TEXT_COLUMN,)):
    """A parquet file with these columns (FineWeb-Edu's text, GSM8K's question and answer), or a one-line error that
    says what to do about it."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        fail(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); it may be truncated: "
             "delete it and run again")
    missing = [name for name in columns if name not in parquet.schema_arrow.names]
    if missing:
        fail(f"{path} has no {' and '.join(map(repr, missing))} column (it has "
             f"{', '.join(parquet.schema_arrow.names)}); is it the dataset the command names?")
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


def tokenize_parquet(c, pool, workers, parquet_path, name, max_tokens=None):
    """Tokenize one parquet file into out_dir/name (through name.tmp); with max_tokens, stop after the first row
    group that reaches it. Row groups go to the pool a few at a time, in order, so the output never depends on
    the number of processes and memory stays at a few row groups."""
    import pyarrow

    parquet = open_parquet(parquet_path)
    tmp, n = os.path.join(c.out_dir, name + ".tmp"), 0
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
    os.replace(tmp, os.path.join(c.out_dir, name))  # only a finished shard gets its name
    return n


def earlier_shards(out_dir, origins, record_path):
    """What an earlier run left (shard_sources.json: each shard's origin and token count) and the shards of it to keep:
    those made from what they would be made from now (a parquet file added to --input moves the val shard to another
    file, a new --val_tokens changes its length) and as long as they were made (a shard cut short since would be
    counted at its new length). A shard with no record, or one without a count, is made again."""
    made_from = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            made_from = json.load(f)

    def kept(name):
        record = made_from.get(name, {})
        return record == origins[name] | {"tokens": record.get("tokens")} and \
            os.path.getsize(os.path.join(out_dir, name)) == 2 * record["tokens"]

    on_disk = [name for name in origins if os.path.isfile(os.path.join(out_dir, name))]
    finished = [name for name in on_disk if kept(name)]
    if finished:
        print(f"{len(finished)} shards were written by an earlier run and are kept (delete one to make it again)")
    if len(on_disk) > len(finished):
        print(f"{len(on_disk) - len(finished)} shards of an earlier run were made from other files or settings (or "
              "cut short since) and are made again")
    return made_from, finished


def prepare_fineweb_edu(c):
    """Download (or take from --input) the parquet files, tokenize each into its own shard, write meta.json last.
    A shard already written from the same file is skipped, so running the same command again resumes where it
    stopped (shard_sources.json records what each shard was made from)."""
    try:
        import pyarrow.parquet  # noqa: F401  (only this dataset needs it)
    except ImportError:
        fail("fineweb_edu needs pyarrow to read parquet: pip install pyarrow")
    if c.input:  # the user's parquet files: the last by name validates, the others train, in name order
        if not os.path.isdir(c.input):
            fail(f"--input={c.input} is not a folder; give the folder that holds the FineWeb-Edu parquet files")
        files = sorted(os.path.join(c.input, f) for f in os.listdir(c.input) if f.endswith(".parquet"))
        if len(files) < 2:
            fail(f"{c.input} holds {len(files)} .parquet files; it needs at least 2 (the last by name validates)")
        sources = {"val_000000.bin": files[-1], **{f"train_{i:06d}.bin": p for i, p in enumerate(files[:-1])}}
        source = os.path.abspath(c.input)
    else:  # download num_shards train shards and the release's last shard into out_dir/parquet
        if not 1 <= c.num_shards <= FINEWEB_LAST_SHARD:
            fail(f"num_shards must be from 1 to {FINEWEB_LAST_SHARD} (shard_{FINEWEB_LAST_SHARD:05d} validates)")
        indices = {"val_000000.bin": FINEWEB_LAST_SHARD, **{f"train_{i:06d}.bin": i for i in range(c.num_shards)}}
        sources = {name: os.path.join(c.out_dir, "parquet", f"shard_{i:05d}.parquet") for name, i in indices.items()}
        source = c.fineweb_url
        os.makedirs(os.path.join(c.out_dir, "parquet"), exist_ok=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = c.num_workers or cores
    _worker["enc"] = r50k_base()  # load it (or fail) once here; forked workers inherit it
    shards, train_done, train_tokens, train_time = {}, 0, 0, 0.0
    print(f"{len(sources) - 1} train shards and 1 val shard from {source}; {workers} tokenizer processes")
    origins = {name: {"source": source, "parquet": os.path.basename(path)} |
               ({"val_tokens": c.val_tokens} if name.startswith("val") else {}) for name, path in sources.items()}
    record_path = os.path.join(c.out_dir, "shard_sources.json")  # shard -> what it was made from, its tokens
    made_from, finished = earlier_shards(c.out_dir, origins, record_path)
    with multiprocessing.Pool(workers) as pool:
        for name, parquet_path in sources.items():  # val first: it is small, and a bad connection shows at once
            shard_path = os.path.join(c.out_dir, name)
            if name in finished:  # a shard appears under its name only whole
                shards[name] = os.path.getsize(shard_path) // 2
                continue
            t0 = time.time()
            if not c.input:  # fetched unless this url's file is here
                download(c, f"{c.fineweb_url}/{os.path.basename(parquet_path)}", parquet_path)
            shards[name] = tokenize_parquet(c, pool, workers, parquet_path, name,
                                            c.val_tokens if name.startswith("val") else None)
            made_from[name] = origins[name] | {"tokens": shards[name]}
            with open(record_path + ".tmp", "w") as f:
                json.dump(made_from, f, indent=1)
            os.replace(record_path + ".tmp", record_path)
            line = f"{name}: {shards[name]:,} tokens | {len(shards)}/{len(sources)} shards done"
            if name.startswith("train"):  # rate and ETA from this run's train shards, downloads included
                train_done += 1
                train_tokens += shards[name]
                train_time += time.time() - t0
                line += (f", {sum(shards.values()):,} tokens | {train_tokens / train_time:,.0f} tokens/s | "
                         f"ETA {format_seconds(train_time / train_done * (len(sources) - len(shards)))}")
            print(line, flush=True)
    write_meta(c.out_dir, {"tokenizer": "r50k_base", "vocab_size": 50257, "eot_token": EOT,
                "shards": dict(sorted(shards.items())), "source": source,
                "parquet_files": {name: os.path.basename(sources[name]) for name in sorted(sources)}})
    print(f"{sum(n for name, n in shards.items() if name.startswith('train')):,} train tokens, "
          f"{shards['val_000000.bin']:,} val tokens")


# -----------------------------------------------------------------------------------------------------------
# question/answer pairs for fine-tuning the released model (train.py --init_from=huginn-0125): each pair one row in
# the release's chat template, tokenized with its tokenizer, padded with <|pad|>. The loss is on the answer only:
# the target AT position t is token t + 1 where that token belongs to the answer, "no loss" elsewhere (the aligned
# format above, so train.py, eval.py and dataloader.py read it as they read reasoning data).

ANSWER = "{}<|end_turn|>"  # closes Huginn's turn, which chat_text opens
CHAT_TOKENS = ("<|begin_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>")


def released_tokenizer(c):
    """The release's tokenizer (a Hugging Face tokenizer.json, read by the tokenizers package) and its file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("the released tokenizer needs: pip install tokenizers")
    path = c.tokenizer
    if not path.endswith(".json"):
        from checkpoints import pretrained_folder  # huginn-0125: its small files downloaded once (then cached)
        try:  # the tokenizer only, not the ~16 GB of weights
            path = os.path.join(pretrained_folder(c.tokenizer, weights=False), "tokenizer.json")
        except (ImportError, OSError) as err:
            fail(f"--tokenizer={c.tokenizer}: {err}")
    if not os.path.isfile(path):
        fail(f"--tokenizer: no tokenizer.json at {path}; give the released model's folder or its tokenizer.json")
    return Tokenizer.from_file(path), path


def write_chat(c, train, val, source):
    """(question, answer) pairs -> rows of row_len tokens; a pair longer than a row is skipped and counted."""
    tok, path = released_tokenizer(c)
    missing = [t for t in CHAT_TOKENS if tok.token_to_id(t) is None]
    if missing:  # else the template would be spelled out as plain text
        fail(f"--tokenizer={path} lacks the chat template's tokens {', '.join(missing)}; give the released model's")
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # the template's tokens are read as ids
    pad = tok.token_to_id("<|pad|>")
    for q, a in train + val:
        if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
            fail(f"{source}: every pair needs a question and an answer as text; got {q!r} and {a!r}")
    # the answer trimmed too, as the release's template trims every text
    pairs = {name: [(encode("<|begin_text|>" + chat_text([("user", q)])), encode(ANSWER.format(a.strip())))
                    for q, a in split] for name, split in (("train", train), ("val", val))}
    length = c.row_len or max(len(p) + len(a) for split in pairs.values() for p, a in split)
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
        write_split(c.out_dir, name, tokens, tok.get_vocab_size())
        np.array(targets, dtype=np.uint16).tofile(os.path.join(c.out_dir, f"{name}_targets.bin"))
    dest = os.path.join(c.out_dir, "tokenizer.json")  # the checkpoint's tokenizer travels with its data ...
    if not (os.path.isfile(dest) and os.path.samefile(path, dest)):  # ... unless it was read from there
        shutil.copy(path, dest)
    write_meta(c.out_dir, {"tokenizer": "huginn", "vocab_size": tok.get_vocab_size(), "row_len": length,
                "folder": os.path.abspath(c.out_dir), "skipped": skipped, "source": source})


def prepare_gsm8k(c):
    """GSM8K (openai/gsm8k, its "main" config as parquet): 7,473 train and 1,319 test pairs; the test split
    validates. --input=DIR reads every train*.parquet and test*.parquet of a folder instead of downloading."""
    try:
        import pyarrow.parquet  # noqa: F401 (checked here, used by open_parquet)
    except ImportError:
        fail("gsm8k needs pyarrow to read parquet: pip install pyarrow")
    files = {}
    for split in ("train", "test"):
        if c.input:
            found = sorted(f for f in os.listdir(c.input) if f.startswith(split) and f.endswith(".parquet"))\
                if os.path.isdir(c.input) else []
            if not found:
                fail(f"--input={c.input} holds no {split}*.parquet (GSM8K's main/{split}-00000-of-00001.parquet)")
            files[split] = [os.path.join(c.input, f) for f in found]
        else:
            files[split] = [os.path.join(c.out_dir, "parquet", f"{split}-00000-of-00001.parquet")]
            download(c, f"{c.gsm8k_url}/{split}-00000-of-00001.parquet", files[split][0])  # unless this url's is here
    splits = {split: [] for split in files}
    for split, paths in files.items():
        for path in paths:
            table = open_parquet(path, ("question", "answer")).read(columns=["question", "answer"])
            splits[split] += zip(table.column("question").to_pylist(), table.column("answer").to_pylist())
    write_chat(c, splits["train"], splits["test"], os.path.abspath(c.input) if c.input else c.gsm8k_url)


def prepare_chat(c):
    """Your own question/answer pairs: --input=FILE, one JSON object per line with "question" and "answer"; a
    random val_fraction of them validates."""
    if not c.input:
        fail('give your pairs with --input=FILE (one JSON object per line: {"question": ..., "answer": ...})')
    pairs = []
    for n, line in enumerate(read_text(c.input, "--input").split("\n"), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            q, a = (str(v) if type(v) in (int, float) else v for v in (pair["question"], pair["answer"]))  # 408 too
        except (ValueError, KeyError, TypeError):
            q = a = None
        if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
            fail(f'{c.input} line {n}: expected {{"question": ..., "answer": ...}} with text in both, '
                 f'got {line[:60]!r}')
        pairs.append((q, a))
    in_val = np.random.default_rng(c.seed).random(len(pairs)) < c.val_fraction
    train = [p for p, v in zip(pairs, in_val) if not v]
    val = [p for p, v in zip(pairs, in_val) if v]
    if not train or not val:
        fail(f"{c.input}: {len(train)} train and {len(val)} val pairs; both need some (check --val_fraction)")
    write_chat(c, train, val, os.path.abspath(c.input))
