"""
Tests for `prepare_data.py fineweb_edu` on small parquet files made here (the release's format: one "text"
column, row groups of a few documents), so nothing is downloaded from the internet: the shards decode back to the
documents, meta.json counts them, the output is the same bytes whatever the number of processes, a download resumes
(from a .part file and after a cut connection) against a local HTTP server, and every failure is one line.

    python -m pytest -q test_fineweb.py
"""

import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
EOT = 50256
ROWS_PER_GROUP = 8
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # the test server is local


def prepare(*args, env=None):
    return subprocess.run([sys.executable, "prepare_data.py", "fineweb_edu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **NO_PROXY, **(env or {})})


def one_line_error(proc, *expected):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and all(e in lines[0] for e in expected), proc.stderr
    return lines[0]


def documents(n, seed):
    """Web-page-like documents of varied length: paragraphs, numbers, punctuation and some non-ASCII text."""
    rng = random.Random(seed)
    words = ("the of and to in is that for it as was with on by be are this from at or an which photosynthesis "
             "students learn energy cells water history river war 1848 science equation x² + y² = r² café naïve "
             "Straße résumé — “quoted” 日本語 Ελληνικά 🙂 e.g. i.e. (see Figure 3) $4.99 50% teacher's don't").split()
    docs = []
    for _ in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 5)):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 18)))
                         for _ in range(rng.randint(1, 6))]
            paragraphs.append(". ".join(s[0].upper() + s[1:] for s in sentences) + rng.choice([".", "?", "!", ":"]))
        docs.append(rng.choice(["", "Title: ", "# "]) + "\n\n".join(paragraphs) + rng.choice(["", "\n", "  \n"]))
    return docs


@pytest.fixture(scope="module")
def pq():
    return pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def enc():
    import tiktoken

    return tiktoken.get_encoding("r50k_base")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pq):
    """Four parquet files named as the release names them: three train, the last (by name) validates."""
    import pyarrow as pa

    folder = tmp_path_factory.mktemp("parquet")
    docs = {}
    for i, name in enumerate(["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet",
                              "shard_01822.parquet"]):
        docs[name] = documents(37 + 5 * i, seed=i)
        pq.write_table(pa.table({"text": docs[name]}), folder / name, row_group_size=ROWS_PER_GROUP,
                       compression="zstd")
    return folder, docs


def expected_tokens(enc, docs):
    return np.array([t for doc in docs for t in [EOT] + enc.encode_ordinary(doc)], dtype=np.uint16)


def read_shard(out_dir, name):
    return np.fromfile(out_dir / name, dtype=np.uint16)


def test_input_folder_round_trip_and_determinism(corpus, enc, tmp_path):
    folder, docs = corpus
    val_docs = docs["shard_01822.parquet"]
    # val: whole row groups until at least val_tokens; ask for a little more than the first two groups hold
    first_two = len(expected_tokens(enc, val_docs[: 2 * ROWS_PER_GROUP]))
    for run, workers in (("a", 1), ("b", 2)):
        proc = prepare(f"--input={folder}", f"--out_dir={tmp_path / run}", f"--val_tokens={first_two + 1}",
                       f"--num_workers={workers}")
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "a"
    meta = json.loads((out / "meta.json").read_text())
    names = ["train_000000.bin", "train_000001.bin", "train_000002.bin", "val_000000.bin"]
    assert meta["tokenizer"] == "r50k_base" and meta["vocab_size"] == 50257 and meta["eot_token"] == EOT
    assert list(meta["shards"]) == names and meta["source"] == str(folder)
    assert list(meta["parquet_files"].values()) == sorted(docs)
    for name, parquet in meta["parquet_files"].items():
        tokens = read_shard(out, name)
        source_docs = docs[parquet] if name.startswith("train") else val_docs[: 3 * ROWS_PER_GROUP]
        assert np.array_equal(tokens, expected_tokens(enc, source_docs)), name
        assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + doc for doc in source_docs)
        assert meta["shards"][name] == len(tokens) and (out / name).stat().st_size == 2 * len(tokens)
    assert sorted(os.listdir(out)) == sorted(names + ["meta.json", "shard_sources.json"])  # no .tmp left behind
    for name in names + ["meta.json"]:  # the same bytes with one process or two
        assert (out / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rerun_keeps_finished_shards_and_remakes_missing_ones(corpus, tmp_path):
    folder, _ = corpus
    assert prepare(f"--input={folder}", f"--out_dir={tmp_path}").returncode == 0
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    kept = (tmp_path / "train_000000.bin").stat().st_mtime_ns
    (tmp_path / "train_000001.bin").unlink()
    (tmp_path / "meta.json").unlink()
    (tmp_path / "train_000001.bin.tmp").write_bytes(b"half a shard from a crash")
    proc = prepare(f"--input={folder}", f"--out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "3 shards were written by an earlier run" in proc.stdout
    assert (tmp_path / "train_000000.bin").stat().st_mtime_ns == kept  # not written again
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_rerun_remakes_shards_whose_source_changed(corpus, pq, tmp_path):
    """A parquet file added to --input moves the val shard to it (the last by name validates): the old val shard
    is not kept, so the file it was made from, now a train shard, is not in val as well. A new --val_tokens
    remakes the val shard too; the train shards stay. A shard cut short since it was made is made again (it was
    kept, and meta.json counted it at its cut length, so the loader's check of that length passed)."""
    import pyarrow as pa

    folder, docs = corpus
    inputs = tmp_path / "in"
    shutil.copytree(folder, inputs)
    out = tmp_path / "out"
    assert prepare(f"--input={inputs}", f"--out_dir={out}").returncode == 0
    old_val = read_shard(out, "val_000000.bin")
    added = documents(50, seed=99)
    pq.write_table(pa.table({"text": added}), inputs / "zz_added.parquet", row_group_size=ROWS_PER_GROUP)
    proc = prepare(f"--input={inputs}", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "1 shards of an earlier run were made from other files or settings" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["parquet_files"]["val_000000.bin"] == "zz_added.parquet"
    val, last_train = read_shard(out, "val_000000.bin"), read_shard(out, f"train_{len(docs) - 1:06d}.bin")
    assert np.array_equal(last_train, old_val) and not np.array_equal(val, old_val)  # not in both splits
    kept = (out / "train_000000.bin").stat().st_mtime_ns
    proc = prepare(f"--input={inputs}", f"--out_dir={out}", f"--val_tokens={len(val) // 2}")
    assert "1 shards of an earlier run were made from other files" in proc.stdout
    assert len(read_shard(out, "val_000000.bin")) < len(val)
    assert (out / "train_000000.bin").stat().st_mtime_ns == kept
    whole = (out / "train_000001.bin").read_bytes()
    (out / "train_000001.bin").write_bytes(whole[:100])
    proc = prepare(f"--input={inputs}", f"--out_dir={out}", f"--val_tokens={len(val) // 2}")
    assert "1 shards of an earlier run were made from other files" in proc.stdout
    assert (out / "train_000001.bin").read_bytes() == whole
    (out / "shard_sources.json").unlink()  # shards with no record of their making (an older run's): made again
    proc = prepare(f"--input={inputs}", f"--out_dir={out}", f"--val_tokens={len(val) // 2}")
    assert proc.returncode == 0 and f"{len(docs) + 1} shards of an earlier run were made from other" in proc.stdout


# -----------------------------------------------------------------------------------------------------------
# downloads, from a local HTTP server that understands Range requests


class Server(http.server.ThreadingHTTPServer):
    """Serves the files of `root` under /data/; /error/ answers 500. Records (path, Range header) of each GET;
    a name in cut_once gets half its bytes once, then the connection closes."""

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.requests, self.cut_once = root, [], set()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/error/"):
            return self.send_error(500)
        if not self.path.startswith("/data/") or not (self.server.root / name).is_file():
            return self.send_error(404)
        data = (self.server.root / name).read_bytes()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
        if start >= len(data):  # as the hub answers a Range past the end
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if name in self.server.cut_once:
            self.server.cut_once.discard(name)
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(corpus):
    server = Server(corpus[0])
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # quick to shut down
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_resumes_and_matches_the_input_folder(corpus, server, tmp_path):
    folder, _ = corpus
    out = tmp_path / "out"
    (out / "parquet").mkdir(parents=True)
    whole = (folder / "shard_00000.parquet").read_bytes()
    (out / "parquet" / "shard_00000.parquet.part").write_bytes(whole[: len(whole) // 2])  # from an earlier run
    complete = (folder / "shard_00002.parquet").stat().st_size  # an earlier run stopped before its rename
    (out / "parquet" / "shard_00002.parquet.part").write_bytes((folder / "shard_00002.parquet").read_bytes())
    for name in ("shard_00000.parquet", "shard_00002.parquet"):  # the url the earlier run fetched them from
        (out / "parquet" / f"{name}.source").write_text(f"{server.url}/data/{name}")
    server.cut_once.add("shard_00001.parquet")  # this one breaks off half-way and must resume
    proc = prepare(f"--fineweb_url={server.url}/data", "--num_shards=3", f"--out_dir={out}", "--download_attempts=2")
    assert proc.returncode == 0, proc.stderr
    assert ("/data/shard_00000.parquet", f"bytes={len(whole) // 2}-") in server.requests
    half = (folder / "shard_00001.parquet").stat().st_size // 2
    assert [r for p, r in server.requests if p.endswith("shard_00001.parquet")] == [None, f"bytes={half}-"]
    assert [r for p, r in server.requests if p.endswith("shard_00002.parquet")] == [f"bytes={complete}-"]
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_01822.parquet"):
        assert (out / "parquet" / name).read_bytes() == (folder / name).read_bytes(), name
    assert not list((out / "parquet").glob("*.part"))
    # the same tokens as from the files on disk (default val_tokens: the whole small val file)
    assert prepare(f"--input={folder}", f"--out_dir={tmp_path / 'local'}").returncode == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == f"{server.url}/data" and len(meta["shards"]) == 4
    for name in meta["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_files_from_another_url_are_fetched_again(corpus, server, tmp_path):
    """A parquet file, or a part of one, that an earlier run fetched from another --fineweb_url is not used: the shards
    were made again from the old url's files (whatever meta.json said), and a part of another file was resumed,
    splicing two files into one that passed the size check. A file with no record of its url (an earlier version's
    download, renamed only once whole) is kept as this url's, not fetched again."""
    folder, _ = corpus
    parquet = tmp_path / "out" / "parquet"
    parquet.mkdir(parents=True)
    other = (folder / "shard_00001.parquet").read_bytes()
    (parquet / "shard_00000.parquet").write_bytes(other)  # whole, from the other url
    (parquet / "shard_00000.parquet.source").write_text("https://elsewhere.example/shard_00000.parquet")
    (parquet / "shard_01822.parquet.part").write_bytes(other[:1000])  # begun from the other url
    (parquet / "shard_01822.parquet.source").write_text("https://elsewhere.example/shard_01822.parquet")
    (parquet / "shard_00001.parquet").write_bytes((folder / "shard_00001.parquet").read_bytes())  # no record
    proc = prepare(f"--fineweb_url={server.url}/data", "--num_shards=2", f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(server.requests) == [(f"/data/{n}.parquet", None) for n in ("shard_00000", "shard_01822")]
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"):
        assert (parquet / name).read_bytes() == (folder / name).read_bytes(), name
        assert (parquet / f"{name}.source").read_text() == f"{server.url}/data/{name}"
    server.requests.clear()  # the same command again fetches nothing
    assert prepare(f"--fineweb_url={server.url}/data", "--num_shards=2", f"--out_dir={tmp_path / 'out'}").returncode == 0
    assert server.requests == []


def test_shakespeare_download_resumes_a_cut_connection(tmp_path):
    """prepare_data.py's text download goes through the same resuming download (a cut connection was a traceback);
    another --shakespeare_url into the same folder fetches its own text (input.txt of the first url was reused)."""
    (tmp_path / "serve").mkdir()
    text = "".join(f"Line {i}: to be, or not to be.\n" for i in range(2000))
    (tmp_path / "serve" / "input.txt").write_text(text)
    (tmp_path / "serve" / "other.txt").write_text(text.upper())
    server = Server(tmp_path / "serve")
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    run = lambda out, url, *args: subprocess.run(
        [sys.executable, "prepare_data.py", "shakespeare_char", f"--out_dir={tmp_path / out}",
         f"--shakespeare_url={server.url}/data/{url}", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, **NO_PROXY})
    try:
        server.cut_once.add("input.txt")
        proc = run("out", "input.txt", "--download_attempts=2")
        first = list(server.requests)
        other = run("out", "other.txt")
        other_text = (tmp_path / "out" / "input.txt").read_text()
        missing, again = run("out", "gone.txt"), run("out", "gone.txt")  # other.txt's text is not gone.txt's
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert [r for _, r in first] == [None, f"bytes={len(text) // 2}-"]
    assert other.returncode == 0, other.stderr
    assert server.requests[len(first)] == ("/data/other.txt", None)
    assert other_text == text.upper()
    assert server.requests[-2:] == [("/data/gone.txt", None)] * 2 and not (tmp_path / "out" / "input.txt").exists()
    one_line_error(missing, "could not download", "(HTTP 404", "pass --input=FILE")
    one_line_error(again, "could not download", "(HTTP 404", "pass --input=FILE")


def test_failed_download_is_one_line(server, tmp_path):
    proc = prepare(f"--fineweb_url={server.url}/missing", f"--out_dir={tmp_path / 'a'}")
    one_line_error(proc, f"could not download {server.url}/missing/shard_01822.parquet (HTTP 404", "--input=DIR")
    assert len(server.requests) == 1  # a 404 is not tried again
    proc = prepare(f"--fineweb_url={server.url}/error", f"--out_dir={tmp_path / 'b'}", "--download_attempts=2")
    one_line_error(proc, "could not download", "(HTTP 500", "run again")
    assert len(server.requests) == 3  # a 500 is
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = prepare(f"--fineweb_url=http://127.0.0.1:{port}", f"--out_dir={tmp_path / 'c'}", "--download_attempts=1")
    one_line_error(proc, f"could not download http://127.0.0.1:{port}/shard_01822.parquet (", "refused")


# -----------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_one_line(corpus, pq, tmp_path):
    import pyarrow as pa

    folder, _ = corpus
    empty, truncated, corrupt, no_text = (tmp_path / d for d in ("empty", "truncated", "corrupt", "no_text"))
    for d in (empty, truncated, corrupt, no_text):
        d.mkdir()
    (empty / "notes.txt").write_text("no parquet here")
    for name in ("shard_00000.parquet", "shard_01822.parquet"):
        data = (folder / name).read_bytes()
        (truncated / name).write_bytes(data[: len(data) - 100] if name == "shard_00000.parquet" else data)
        if name == "shard_00000.parquet":  # a damaged page: the footer reads, the data does not
            data = data[:1000] + bytes(b ^ 0x5A for b in data[1000:3000]) + data[3000:]
        (corrupt / name).write_bytes(data)
        pq.write_table(pa.table({"content": ["a document", "another"]}), no_text / name)
    cases = {
        ("is not a folder",): tmp_path / "missing",
        ("holds 0 .parquet files",): empty,
        (f"{truncated / 'shard_00000.parquet'} is not a readable parquet file", "delete it and run again"): truncated,
        (f"could not read {corrupt / 'shard_00000.parquet'}", "delete it and run again"): corrupt,
        ("has no 'text' column", "content"): no_text,
    }
    for expected, input_dir in cases.items():
        one_line_error(prepare(f"--input={input_dir}", f"--out_dir={tmp_path / 'out'}"), *expected)
    one_line_error(prepare("--num_shards=0", f"--out_dir={tmp_path / 'out'}"), "num_shards must be from 1 to 1822")


def test_missing_pyarrow_is_a_one_line_hint(tmp_path):
    """A pyarrow that fails to import, put first on the path, stands in for a machine without it."""
    (tmp_path / "pyarrow").mkdir()
    (tmp_path / "pyarrow" / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    proc = prepare(f"--out_dir={tmp_path / 'out'}", env={"PYTHONPATH": str(tmp_path)})
    assert one_line_error(proc) == "error: fineweb_edu needs pyarrow to read parquet: pip install pyarrow"


# --- train.py on the shards -------------------------------------------------------------------------------------

TINY = ["--n_embd=32", "--n_head=2", "--n_layers_prelude=1", "--n_layers_core=1", "--n_layers_coda=1",
        "--intermediate_size=64", "--mean_recurrence=3", "--backprop_depth=2", "--batch_size=4", "--block_size=16",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--device=cpu", "--compile=False", "--log_interval=1",
        "--warmup_iters=2", "--num_threads=1", "--eval_interval=4", "--max_iters=8", "--lr_decay_iters=8"]


def train(*args):
    proc = subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc


def logged_losses(out_dir):
    with open(out_dir / "log.jsonl") as f:
        return {rec["iter"]: rec["loss"] for rec in map(json.loads, f) if "loss" in rec}


def test_train_on_shards_with_exact_resume(corpus, tmp_path):
    """train.py reads the token shards (memory-mapped, blocks drawn across all of them), pads GPT-2's vocabulary to
    50304, resumes exactly, and names a truncated shard in one line."""
    folder, _ = corpus
    data = tmp_path / "data"
    assert prepare(f"--input={folder}", f"--out_dir={data}", "--val_tokens=1").returncode == 0
    straight, split = tmp_path / "straight", tmp_path / "split"
    with ThreadPoolExecutor(2) as pool:  # the straight run and the first half side by side: one thread each
        first = list(pool.map(lambda args: train(f"--data_dir={data}", *args),
                              [[f"--out_dir={straight}"], [f"--out_dir={split}", "--max_iters=4"]]))
    for proc in first + [train(f"--data_dir={data}", f"--out_dir={split}", "--init_from=resume")]:
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert logged_losses(straight) == logged_losses(split) and sorted(logged_losses(straight)) == list(range(8))
    import torch
    checkpoint = torch.load(straight / "ckpt.pt", weights_only=True)
    assert checkpoint["model_config"]["vocab_size"] == 50304 and checkpoint["meta"]["vocab_size"] == 50257
    # the blocks come from every train shard: with a fixed seed, 8 iterations x 4 rows land in all three
    sys.path.insert(0, REPO)
    from dataloader import TokenData
    tokens = TokenData(str(data), 16)
    assert len(tokens.shards["train"]) == 3 and tokens.num_blocks("train") == sum(
        len(read_shard(data, name)) - 16 for name in tokens.shards["train"])
    shard_of = [int(np.searchsorted(tokens.first_block["train"], b, side="right")) - 1
                for b in torch.randint(tokens.num_blocks("train"), (200,), generator=torch.Generator().manual_seed(0))
                .tolist()]
    assert set(shard_of) == {0, 1, 2}
    # the fixed evaluation blocks stay inside a split of more than 2^24 blocks (FineWeb-Edu's 2B tokens), where
    # float32 steps would round the last one past the end
    big = TokenData(str(data), 16)
    big.first_block = {"train": np.array([0, 2**24 + 4])}  # one shard of 2^24 + 4 blocks
    blocks = big.evenly_spaced("train", 64)
    assert blocks[0] == 0 and blocks[-1] == 2**24 + 3 and (blocks.diff() > 0).all()
    x, y = tokens.batch("train", torch.tensor([tokens.first_block["train"][1]]))  # the first block of shard 1
    assert torch.equal(x[0], torch.from_numpy(read_shard(data, "train_000001.bin")[:16].astype(np.int64)))
    assert torch.equal(y[0, :-1], x[0, 1:])
    # the shards are those meta.json names: one left by an earlier run with more shards is not read, and a
    # named one that is gone is one line
    (data / "train_000003.bin").write_bytes((data / "train_000000.bin").read_bytes())
    assert TokenData(str(data), 16).shards["train"] == tokens.shards["train"]
    (data / "train_000002.bin").rename(data / "moved.bin")
    one_line_error(train(f"--data_dir={data}", f"--out_dir={tmp_path / 'gone'}"), "train_000002.bin is missing")
    (data / "moved.bin").rename(data / "train_000002.bin")
    # a shard cut short: one line that names it
    with open(data / "train_000001.bin", "r+b") as f:
        f.truncate(100)
    one_line_error(train(f"--data_dir={data}", f"--out_dir={tmp_path / 'cut'}"), "train_000001.bin is truncated",
                   "(50 of")
