"""
Turn a dataset into the token files train.py reads:

    python prepare_data.py shakespeare_char                       # characters as tokens (downloads 1 MB)
    python prepare_data.py shakespeare                            # GPT-2 BPE (tiktoken r50k_base)
    python prepare_data.py shakespeare_char --input=../shared/data/tinyshakespeare.txt   # a local copy

Writes data/<dataset>/ next to this file (or --out_dir):
    train.bin, val.bin   the token ids as one uint16 stream each (np.uint16, tofile)
    meta.json            how to decode them: {"tokenizer": "char", "vocab_size": V, "chars": ...}
                         or {"tokenizer": "r50k_base", "vocab_size": 50257}
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
# which dataset, where to, then run it

DATASETS = ["shakespeare_char", "shakespeare"]
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
