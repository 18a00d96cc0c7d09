"""
Read the token files that prepare_data.py writes (the format is in its docstring) as batches of blocks. Used by
train.py, and by eval.py, exits.py, latents.py and bench.py on a checkpoint's data.

A split ("train", "val") is one file, train.bin, or several shards, train_000000.bin, train_000001.bin, ... (uint16
token ids). Blocks of block_size tokens are numbered over all shards, so a batch is a tensor of block numbers:
drawn at random for training, evenly spaced for evaluation. Reasoning data comes in rows of row_len tokens (a block
is a whole row) with a target file aligned with the tokens: the label AT each position, 65535 for no loss.
"""

import json
import os
import re

import numpy as np
import torch

from configurator import fail

NO_LOSS = 65535  # the target id that means "no loss here"; it becomes -1, cross_entropy's ignore_index


def default_folder(dataset):
    """Where prepare_data.py writes a dataset unless told otherwise: data/<dataset> beside the scripts."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)


def data_folder(checkpoint, data_dir=""):
    """Where the data a checkpoint was trained on is (train.py's settings, saved in it), or data_dir."""
    train_config = checkpoint["config"]
    return data_dir or train_config.get("data_dir") or default_folder(train_config.get("dataset", "<dataset>"))


def checkpoint_data(checkpoint, data_dir=""):
    """The data a checkpoint was trained on, or the one in data_dir; it must have the checkpoint's vocabulary."""
    train_config, folder = checkpoint["config"], data_folder(checkpoint, data_dir)
    data = TokenData(folder, train_config["block_size"], train_config.get("dataset", "<dataset>"))
    key = vocabulary_differs(data.meta, checkpoint["meta"])
    if key:
        fail(f"the data in {folder} has another vocabulary than the checkpoint ({key} differs); give the data "
             "it was trained on with --data_dir")
    return data


def vocabulary_differs(meta, other):
    """The first of tokenizer, vocab_size, chars in which two datasets' meta.json differ: None if an id means the
    same token in both."""
    return next((key for key in ("tokenizer", "vocab_size", "chars") if meta.get(key) != other.get(key)), None)


class TokenData:

    def __init__(self, data_dir, block_size, dataset="<dataset>", block_size_flag=None):
        """The splits in data_dir, checked before any batch is read: metadata, file sizes, token ids against the
        vocabulary, targets, and block_size against the data (block_size_flag: the setting that fixes it; None
        when it comes from a checkpoint)."""
        self.data_dir, self.block_size = data_dir, block_size
        hint = self.prepare_hint(dataset, data_dir)
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            fail(f"no meta.json in {data_dir}; {hint}")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (ValueError, OSError) as err:  # cut short, not JSON, not UTF-8
            fail(f"{meta_path} is not readable JSON ({err}); {hint} again")
        if not isinstance(self.meta, dict) or type(self.meta.get("vocab_size")) is not int or \
                not 1 <= self.meta["vocab_size"] <= 2**16 or "tokenizer" not in self.meta:
            fail(f"{meta_path} lacks a tokenizer and a vocab_size from 1 to 65536; {hint} again")
        if self.meta["tokenizer"] not in ("char", "r50k_base", "huginn"):
            fail(f"{meta_path} names the tokenizer {self.meta['tokenizer']!r}, not char, r50k_base or huginn; {hint}")
        chars = self.meta.get("chars")  # a character vocabulary's id -> character, the decoder a checkpoint carries
        if self.meta["tokenizer"] == "char" and not (isinstance(chars, (str, list)) and all(
                isinstance(c, str) and len(c) == 1 for c in chars) and len(chars) == self.meta["vocab_size"]):
            fail(f"{meta_path} lacks its vocab_size of characters (\"chars\"); {hint} again")
        if self.meta["tokenizer"] == "huginn":  # the release's tokenizer, copied beside the data (corpora.write_chat):
            path = os.path.join(data_dir, "tokenizer.json")  # its text goes into the meta, so checkpoints carry it
            if not os.path.isfile(path):
                fail(f"no tokenizer.json in {data_dir} (its meta.json names the released tokenizer); {hint} again")
            with open(path, encoding="utf-8") as f:
                self.meta["tokenizer_json"] = f.read()
        # a sharded corpus's meta.json names its shards, other data is train.bin and val.bin: those are the data,
        # whatever else an earlier run left in the folder
        files = self.meta.get("shards") or [f for f in os.listdir(data_dir) if f in ("train.bin", "val.bin")]
        self.shards = {split: sorted(f for f in files if re.fullmatch(rf"{split}(_\d+)?\.bin", f))
                       for split in ("train", "val")}
        self.row_len = self.meta.get("row_len")  # rows of a fixed length (reasoning data): a block is a row
        self.aligned = self.row_len is not None  # rows come with their targets, one per position (*_targets.bin)
        if self.aligned and not (self.shards == {"train": ["train.bin"], "val": ["val.bin"]}
                                 and os.path.isfile(os.path.join(data_dir, "val_targets.bin"))):
            fail(f"{data_dir} has rows but not one train.bin and val.bin with their targets; {hint}")
        for split, files in self.shards.items():
            if not files:
                fail(f"no {split}.bin or {split}_*.bin shards in {data_dir}; {hint}")
            for name in files + ([f"{split}_targets.bin"] if self.aligned else []):
                self.check_file(name, split, hint)
        if self.aligned and "examples" in self.meta:  # problems: each val position's difficulty (eval, exits, latents)
            self.check_file("val_difficulty.bin", "val", hint)
        if self.row_len is not None and block_size != self.row_len:
            fix = f"set {block_size_flag}={self.row_len}" if block_size_flag else \
                f"the checkpoint reads blocks of {block_size}: give the data it was trained on with --data_dir"
            fail(f"{data_dir} is made of rows of {self.row_len} tokens; {fix}")
        # block numbers: a shard's blocks start at whole rows, or at any token with room for the shifted target
        self.first_block = {}
        for split, files in self.shards.items():
            lengths = [len(self.tokens(f)) for f in files]
            blocks = [n // self.row_len if self.row_len else max(0, n - block_size - (not self.aligned) + 1)
                      for n in lengths]
            if sum(blocks) == 0:
                fix = "lower --block_size" if block_size_flag else "give more data with --data_dir"
                fail(f"block_size={block_size} is too long for the {split} data (longest shard: {max(lengths):,} "
                     f"tokens); {fix}")
            self.first_block[split] = np.cumsum([0] + blocks)  # shard i holds blocks first_block[i] ..

    @staticmethod
    def prepare_hint(dataset, data_dir):
        """What to run when a dataset's files are missing or broken (into data_dir, where it is not data/<dataset>)."""
        from prepare_data import DATASETS  # its settings and dispatch run only as a script
        if dataset in DATASETS:
            return f"run: python prepare_data.py {dataset}" + \
                ("" if os.path.abspath(data_dir) == default_folder(dataset) else f" --out_dir={data_dir}")
        return f"make it with prepare_data.py (--dataset names a folder under data/ it made: {', '.join(DATASETS)})"

    def check_file(self, name, split, hint):
        """A token or target file: whole uint16 values, the length meta.json gives, ids inside the vocabulary."""
        path = os.path.join(self.data_dir, name)
        if not os.path.isfile(path):
            fail(f"{path} is missing; {hint} again")
        size = os.path.getsize(path)
        expected = self.meta.get("shards", {}).get(name)
        if size == 0 or size % 2:
            fail(f"{path} is {'empty' if size == 0 else 'cut short (an odd number of bytes)'}; delete it and {hint}")
        if expected is not None and size != 2 * expected:  # a shard cut short by a crash or a full disk
            fail(f"{path} is truncated ({size // 2:,} of {expected:,} tokens); delete it and {hint} again")
        values = self.tokens(name)
        if self.row_len and len(values) % self.row_len:  # a row cut, or rows of another length
            fail(f"{path} holds {len(values):,} values, not whole rows of {self.row_len} (meta.json's row_len); "
                 f"{hint} again")
        if name.endswith(("_targets.bin", "_difficulty.bin")):
            if len(values) != len(self.tokens(f"{split}.bin")):
                fail(f"{path} has {len(values):,} values for {len(self.tokens(split + '.bin')):,} tokens; "
                     f"{hint} again")
            if name.endswith("_difficulty.bin"):
                return  # difficulties, not token ids
            labelled = values[values != NO_LOSS]
            if split == "train" and len(labelled) == 0:
                fail(f"{path} has no labelled positions: nothing to learn; {hint} with some problems")
            largest = int(labelled.max()) if len(labelled) else 0
        else:
            largest = int(values.max())
        if largest >= self.meta["vocab_size"]:
            fail(f"{path} holds token id {largest}, outside the vocabulary of {self.meta['vocab_size']} in meta.json; "
                 f"{hint} again")

    def tokens(self, name):
        # memmap again on every call, as nanoGPT does: a long-lived memmap keeps growing in RAM (nanoGPT #287)
        return np.memmap(os.path.join(self.data_dir, name), dtype=np.uint16, mode="r")

    def num_blocks(self, split):
        return int(self.first_block[split][-1])

    def evenly_spaced(self, split, n, once=False):
        """n block numbers spread over the whole split: a fixed evaluation set. A split of fewer blocks repeats some
        (train.py's evaluation keeps its eval_iters full batches); once: each at most once, fewer than n then."""
        n = min(n, self.num_blocks(split)) if once else n
        # in integers: float32's linspace rounds its last value up past the end above 2^24 blocks
        return torch.arange(n) * (self.num_blocks(split) - 1) // max(n - 1, 1)

    def val_problems(self):
        """Reasoning data's val split as rows (n_rows, block_size): the targets, each position's difficulty, which
        positions are labelled, and which begin a problem (a maximal run of labelled positions of one difficulty)."""
        n = self.num_blocks("val") * self.block_size
        targets, difficulty = (self.tokens(name)[:n].astype(np.int64).reshape(-1, self.block_size)
                               for name in ("val_targets.bin", "val_difficulty.bin"))
        labelled = targets != NO_LOSS
        first = labelled.copy()  # a problem's first position: its left neighbour is unlabelled or of another difficulty
        first[:, 1:] &= ~labelled[:, :-1] | (difficulty[:, 1:] != difficulty[:, :-1])
        return targets, difficulty, labelled, first

    def batch(self, split, blocks):
        """x, y (B, block_size) int64 on the CPU for the numbered blocks: y is x shifted by one, or the aligned
        targets with "no loss" as -1."""
        xs, ys = [], []
        for block in blocks.tolist():
            i = int(np.searchsorted(self.first_block[split], block, side="right")) - 1  # the shard holding it
            start = (block - int(self.first_block[split][i])) * (self.row_len or 1)
            data, end = self.tokens(self.shards[split][i]), start + self.block_size
            xs.append(torch.from_numpy(data[start:end].astype(np.int64)))
            if self.aligned:
                y = torch.from_numpy(self.tokens(f"{split}_targets.bin")[start:end].astype(np.int64))
                ys.append(y.masked_fill(y == NO_LOSS, -1))
            else:
                ys.append(torch.from_numpy(data[start + 1:end + 1].astype(np.int64)))
        return torch.stack(xs), torch.stack(ys)
