"""Fine-tuning the released layout (train.py --init_from=<folder>), on a tiny model saved in that layout with a
tiny character tokenizer made here: chat and GSM8K data, full fine-tuning, LoRA (base untouched, exact resume),
FSDP2 against one process, the memory plan, and export.py's round trip. CPU only; needs safetensors, tokenizers,
pyarrow and peft (skipped without them)."""

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from checkpoints import from_pretrained, load_checkpoint, load_released, trained_init_scale
from decode import gate_net
from test_pretrained import RELEASED_CONFIG, reference_tensors, write_checkpoint

# every test here reads or writes the released layout: without these two the file is skipped, saying what to install
pytestmark = [pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"needs {name} (pip install {name})")
              for name in ("tokenizers", "safetensors")]

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SPECIAL = ["<|begin_text|>", "<|end_text|>", "<|begin_header|>", "<|end_header|>", "<|end_turn|>", "<|pad|>"]
CHARS = "\n !+0123456789?HWadehiklnorstuw"


def pairs(n, seed=0):
    """Sums to learn: {"question": "what is 3+4?", "answer": "7"}."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 10, (2, n), generator=g).tolist()
    return [{"question": f"what is {x}+{y}?", "answer": str(x + y)} for x, y in zip(a, b)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny model in the released layout (64-token vocabulary) with a character tokenizer.json, and chat data
    prepared from it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    tmp = tmp_path_factory.mktemp("release")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character a token
    tok.add_special_tokens(SPECIAL)
    config = {**RELEASED_CONFIG, "n_embd": 32, "n_heads": 2, "n_layers": 4, "block_size": 64, "vocab_size": 64,
              "intermediate_size": 48, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
              "n_layers_in_coda": 1, "mean_recurrence": 3, "mean_backprop_depth": 2}
    write_checkpoint(tmp / "model", config, reference_tensors(config), shards=2)
    tok.save(str(tmp / "model" / "tokenizer.json"))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(400)))
    run("prepare_data.py", "chat", f"--input={tmp / 'pairs.jsonl'}", f"--tokenizer={tmp / 'model' / 'tokenizer.json'}",
        f"--out_dir={tmp / 'chat'}", "--val_fraction=0.1")
    return tmp


def run(*args, check=True, launcher=(sys.executable,)):
    proc = subprocess.run([*launcher, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def finetune_args(release, out, *extra):
    row_len = json.loads((release / "chat" / "meta.json").read_text())["row_len"]
    return ["train.py", f"--init_from={release / 'model'}", f"--data_dir={release / 'chat'}", f"--out_dir={out}",
            f"--block_size={row_len}", "--batch_size=8", "--gradient_accumulation_steps=1", "--eval_iters=2",
            "--device=cpu", "--compile=False", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2",
            "--mean_recurrence=3", "--backprop_depth=2", "--num_threads=1", *extra]


def losses(out):
    with open(out / "log.jsonl") as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_chat_rows_carry_the_loss_on_the_answer_only(release, tmp_path):
    from tokenizers import Tokenizer
    meta = json.loads((release / "chat" / "meta.json").read_text())
    tok = Tokenizer.from_file(str(release / "chat" / "tokenizer.json"))
    tokens = np.fromfile(release / "chat" / "val.bin", dtype=np.uint16).reshape(-1, meta["row_len"])
    targets = np.fromfile(release / "chat" / "val_targets.bin", dtype=np.uint16).reshape(-1, meta["row_len"])
    assert meta["tokenizer"] == "huginn"
    row, target = tokens[0].tolist(), targets[0].tolist()
    text = tok.decode(row, skip_special_tokens=False).replace(" ", "")
    assert text.startswith("<|begin_text|><|begin_header|>user<|end_header|>")
    labelled = [t for t in target if t != 65535]  # the answer's tokens and the <|end_turn|> that closes it
    assert labelled[-1] == tok.token_to_id("<|end_turn|>") and 2 <= len(labelled) <= 3
    first = target.index(labelled[0])
    assert row[first + 1:first + 1 + len(labelled)] == labelled  # aligned: the target at t is token t + 1
    # made again in place, from the tokenizer.json it holds (a SameFileError had left new rows under the old meta)
    shutil.copytree(release / "chat", tmp_path / "chat")
    run("prepare_data.py", "chat", f"--input={release / 'pairs.jsonl'}", f"--out_dir={tmp_path / 'chat'}",
        f"--tokenizer={tmp_path / 'chat' / 'tokenizer.json'}", "--val_fraction=0.1", f"--row_len={meta['row_len'] + 5}")
    assert json.loads((tmp_path / "chat" / "meta.json").read_text())["row_len"] == meta["row_len"] + 5


def test_full_finetuning_lowers_the_answer_loss(release, tmp_path):
    shutil.copytree(release / "chat", tmp_path / "chat")

    def rows_too_long():  # checked at the end, against a base whose weights do not even read: before they are read
        run("prepare_data.py", "chat", f"--input={release / 'pairs.jsonl'}", "--row_len=100", "--val_fraction=0.1",
            f"--tokenizer={release / 'model' / 'tokenizer.json'}", f"--out_dir={tmp_path / 'long'}")
        os.makedirs(tmp_path / "unread")
        shutil.copy(release / "model" / "config.json", tmp_path / "unread")
        (tmp_path / "unread" / "model.safetensors").write_bytes(b"never read")
        return run(*finetune_args(release, tmp_path / "out-long", "--max_iters=1", f"--data_dir={tmp_path / 'long'}",
                                  "--block_size=100", f"--init_from={tmp_path / 'unread'}"), check=False)
    with ThreadPoolExecutor(1) as pool:  # beside the training run: one thread each
        too_long = pool.submit(rows_too_long)
        proc = run(*finetune_args(release, tmp_path / "out", "--max_iters=30", "--eval_interval=30",
                                  f"--data_dir={tmp_path / 'chat'}"))
    assert "memory plan per process: weights" in proc.stdout and "peak memory of this process" in proc.stdout
    logged = losses(tmp_path / "out")
    assert sum(logged[i] for i in range(25, 30)) < 0.85 * sum(logged[i] for i in range(5))
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert "model" in checkpoint and checkpoint["base"] == str(release / "model")
    # it runs, as it trained, with the release's stored RoPE table (ours differs in the last bits)
    assert torch.equal(load_checkpoint(str(tmp_path / "out"))[0].rope, from_pretrained(str(release / "model")).rope)
    # the saved settings are what ran: the release's architecture, not train.py's defaults
    assert {k: checkpoint["config"][k] for k in ("n_embd", "n_head", "intermediate_size")} == \
        {k: checkpoint["model_config"][k] for k in ("n_embd", "n_head", "intermediate_size")} == \
        {"n_embd": 32, "n_head": 2, "intermediate_size": 48}
    # the checkpoint carries its tokenizer: it samples with its data folder gone
    assert checkpoint["meta"]["tokenizer_json"] == (release / "model" / "tokenizer.json").read_text()
    shutil.rmtree(tmp_path / "chat")
    proc = run("sample.py", f"--out_dir={tmp_path / 'out'}", "--chat", "--start=what is 2+3?", "--max_new_tokens=2",
               "--r=2", "--device=cpu", "--num_threads=1")
    assert "<|end_header|>" in proc.stdout
    # rows longer than the release's 64 positions: one line, before any training
    proc = too_long.result()
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "do not fit the release" in proc.stderr


def test_a_full_finetune_outlives_its_base_folder(release, tmp_path):
    """The base named by a relative path is recorded by its absolute one (the checkpoint worked only from the folder
    it was trained in); with the base gone, a full fine-tune (every weight in it) still exports and resumes; a run
    whose --out_dir is a model in the released layout stops before writing its config.json over the model's."""
    shutil.copytree(release / "model", tmp_path / "base")
    args = finetune_args(release, tmp_path / "out", "--max_iters=1")
    args[1] = f"--init_from={os.path.relpath(tmp_path / 'base', REPO)}"
    config = (tmp_path / "base" / "config.json").read_text()
    into_base_args = [*args[:3], f"--out_dir={tmp_path / 'base'}", *args[4:]]
    with ThreadPoolExecutor(1) as pool:  # beside the run into out: one thread each
        into_base = pool.submit(run, *into_base_args, check=False)
        run(*args)
        into_base = into_base.result()
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["base"] == str(tmp_path / "base")
    assert into_base.returncode != 0 and into_base.stderr.count("\n") == 1 and "released layout" in into_base.stderr
    assert (tmp_path / "base" / "config.json").read_text() == config
    shutil.rmtree(tmp_path / "base")
    proc = run("export.py", f"--out_dir={tmp_path / 'out'}", f"--to={tmp_path / 'exported'}")
    assert "config.json is gone" in proc.stderr
    exported, model = from_pretrained(str(tmp_path / "exported")), load_checkpoint(str(tmp_path / "out"))[0]
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), model.state_dict().values()))
    # and it trains on: resuming needs no base either (it stopped, naming the folder it could not find)
    run(*args, "--init_from=resume", "--max_iters=2")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 2


def test_lora_trains_only_the_adapters_and_resumes_exactly(release, tmp_path):
    pytest.importorskip("peft", reason="needs peft (pip install peft)")
    lora = ["--lora_rank=4", "--lora_modules=core,adapter", "--eval_interval=10", "--lr_decay_iters=20"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    argv = sys.argv
    with ThreadPoolExecutor(1) as pool:  # the split run's first half beside the straight run: one thread each
        first_half = pool.submit(run, *finetune_args(release, split, *lora, "--max_iters=10"))
        try:  # in this process, to look at the model afterwards
            sys.argv = finetune_args(release, straight, *lora, "--max_iters=20")
            trained = runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")["raw_model"]
        finally:
            sys.argv = argv
        first_half.result()
    base, trained = from_pretrained(str(release / "model")), trained.state_dict()
    for name, p in base.state_dict().items():  # every base weight bit for bit as released
        ours = name if name in trained else name.replace(".weight", ".base_layer.weight")  # peft's name for a base
        assert torch.equal(trained[ours], p), name
    checkpoint = torch.load(straight / "ckpt.pt", weights_only=True)
    assert "model" not in checkpoint and set(checkpoint["lora_config"]) == {"rank", "alpha", "modules"}
    assert all(".lora_" in name for name in checkpoint["lora"])
    run(*finetune_args(release, split, *lora, "--max_iters=20", "--init_from=resume"))
    a, b = losses(straight), losses(split)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]  # bit for bit
    assert sum(a[i] for i in range(15, 20)) < sum(a[i] for i in range(5))  # and it learns


def test_lora_adapters_stay_float32_over_a_bf16_base(release):
    """On a GPU the frozen base is bf16; peft makes adapters in the base's dtype, where AdamW's small updates
    would mostly round away: they are float32."""
    pytest.importorskip("peft", reason="needs peft (pip install peft)")
    from finetune import add_lora
    model = from_pretrained(str(release / "model"))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model = add_lora(model, 4, 8.0, "core,adapter")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6),
                    reason="FSDP2 on a CPU needs a torch newer than 2.5 (train.py says so in one line)")
def test_fsdp_two_processes_match_one(release, tmp_path):
    common = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2", "--eval_iters=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    with ThreadPoolExecutor(1) as pool:  # the one-process run beside the two
        alone = pool.submit(run, *finetune_args(release, one, *common))
        run(*finetune_args(release, two, *common, "--fsdp"),
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
        alone.result()
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(4))
    for i in range(4):
        assert b[i] == pytest.approx(a[i], abs=1e-4)
    model_one, _ = load_checkpoint(str(one))
    model_two, _ = load_checkpoint(str(two))
    for (name, p), q in zip(model_one.state_dict().items(), model_two.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_exports_samples_and_exits(release, tmp_path, lora):
    if lora:
        pytest.importorskip("peft", reason="needs peft (pip install peft)")
    out = tmp_path / "out"
    run(*finetune_args(release, out, "--max_iters=6", "--eval_interval=6", "--init_scale=0.5",
                       *(["--lora_rank=4"] if lora else [])))
    (release / "model" / "generation_config.json").write_text('{"eos_token_id": [65505, 65508]}')  # the hub's has one
    config = json.loads((release / "model" / "config.json").read_text())  # and a local auto_map, as the authors' repo
    config["auto_map"] = {"AutoConfig": "raven_config_minimal.RavenConfig"}
    (release / "model" / "config.json").write_text(json.dumps(config))
    run("export.py", f"--out_dir={out}", f"--to={tmp_path / 'exported'}", "--shard_gb=0.0001")
    model, _ = load_checkpoint(str(out))  # adapters folded in
    exported = from_pretrained(str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    assert (tmp_path / "exported" / "generation_config.json").read_text() == '{"eos_token_id": [65505, 65508]}'
    auto_map = json.loads((tmp_path / "exported" / "config.json").read_text())["auto_map"]
    assert all(name.startswith("tomg-group-umd/huginn-0125--") for name in auto_map.values())  # code by its hub name
    assert (tmp_path / "exported" / "model.safetensors.index.json").is_file()  # tiny shards: several files
    idx = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = model(idx, num_steps=3, init_scale=0)
        b, _ = exported(idx, num_steps=3, init_scale=0)
    assert torch.equal(a, b)  # tensor for tensor
    # and it starts from the noise it trained with, as the checkpoint does (it started from 1, the release's)
    assert trained_init_scale(None, load_released(str(tmp_path / "exported"), "cpu", torch.float32)[1]) == 0.5
    # a fine-tune answers in the release's chat format (sample.py --chat), and latents.py looks inside it as text
    with ThreadPoolExecutor(1) as pool:  # side by side: one thread each
        looked = pool.submit(run, "latents.py", f"--out_dir={out}", "--start=what is 2+3?", "--r=2", "--device=cpu",
                             "--num_threads=1", f"--plot_dir={tmp_path / 'plots'}")
        proc = run("sample.py", f"--out_dir={out}", "--chat", "--start=what is 2+3?", "--max_new_tokens=4", "--r=2",
                   "--device=cpu", "--num_threads=1")
        looked.result()
    assert "<|end_header|>" in proc.stdout  # the prompt went in as a user turn (this tokenizer decodes spaced)
    if not lora:  # exits.py scores a fine-tune where it has targets: the answers, not the prompts and padding
        proc = run("exits.py", f"--out_dir={out}", "--r=4", "--fixed_r=[4]", "--rules={}", "--rounds=1",
                   "--max_rows=8", "--epochs=1", "--device=cpu", "--num_threads=1")
        from dataloader import TokenData  # the rows exits.py reads: train.py's evaluation blocks, the first 8
        data = TokenData(str(release / "chat"), json.loads((release / "chat" / "meta.json").read_text())["row_len"])
        _, y = data.batch("val", data.evenly_spaced("val", 2 * 8)[:8])
        assert f"({int((y >= 0).sum())} positions counted)" in proc.stdout and (y < 0).any()
    # exits.py's gate beside the checkpoint is loaded with it, a LoRA run's too
    net = gate_net(8)
    torch.save({"state_dict": net.state_dict(), "hidden": 8, "mean": torch.zeros(19), "std": torch.ones(19)},
               out / "exit_gate.pt")
    assert torch.equal(load_checkpoint(str(out))[0].exit_gate["net"][0].weight, net[0].weight)


def test_chat_pairs_are_trimmed_and_checked(release, tmp_path):
    """Each text is trimmed as the release's template trims it: pairs with spaces and newlines around them give the
    very rows of clean ones. A pair without text, or a tokenizer without the template's tokens, is one line."""
    from tokenizers import Tokenizer, models
    tokenizer = release / "model" / "tokenizer.json"
    clean = pairs(30)
    padded = [{"question": f"  {p['question']}\n", "answer": f" {p['answer']}\n\n"} for p in clean]
    for name, rows in (("clean", clean), ("padded", padded), ("null", [*clean, {"question": "what?", "answer": None}])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    prepare = lambda name, tok=tokenizer: run("prepare_data.py", "chat", f"--input={tmp_path / (name + '.jsonl')}",
                                              f"--tokenizer={tok}", f"--out_dir={tmp_path / name}", "--row_len=40",
                                              "--val_fraction=0.2", check=False)
    assert prepare("clean").returncode == 0 and prepare("padded").returncode == 0
    for file in ("train.bin", "train_targets.bin", "val.bin", "val_targets.bin"):
        assert (tmp_path / "clean" / file).read_bytes() == (tmp_path / "padded" / file).read_bytes(), file
    null = prepare("null")
    assert null.returncode != 0 and null.stderr.count("\n") == 1 and "with text in both" in null.stderr
    plain = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="?"))  # no special tokens
    plain.save(str(tmp_path / "plain.json"))
    no_chat = prepare("clean", tmp_path / "plain.json")
    assert no_chat.returncode != 0 and "lacks the chat template's tokens <|begin_text|>" in no_chat.stderr


def test_gsm8k_from_local_parquet_skips_what_does_not_fit(release, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        rows = pairs(n, seed=len(split))
        rows[0]["answer"] = "1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1 #### 30"
        files = 2 if split == "train" else 1  # every file of a split is read (only the first one was)
        for i in range(files):
            part = rows[i * n // files:(i + 1) * n // files]
            pq.write_table(pa.table({"question": [r["question"] for r in part], "answer": [r["answer"] for r in part]}),
                           data / f"{split}-{i:05d}-of-{files:05d}.parquet")
    proc = run("prepare_data.py", "gsm8k", f"--input={data}", f"--tokenizer={release / 'model' / 'tokenizer.json'}",
               f"--out_dir={tmp_path / 'out'}", "--row_len=40")
    assert "train: skipped 1 of 40 pairs longer than row_len=40 tokens" in proc.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"] == {"train": 1, "val": 1} and meta["row_len"] == 40
    bad = run("prepare_data.py", "gsm8k", f"--input={tmp_path}", f"--tokenizer={release / 'model' / 'tokenizer.json'}",
              f"--out_dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "holds no train*.parquet" in bad.stderr
    (data / "train-00001-of-00002.parquet").write_bytes(b"PAR1 cut short")  # a damaged download: one line
    cut = run("prepare_data.py", "gsm8k", f"--input={data}", f"--tokenizer={release / 'model' / 'tokenizer.json'}",
              f"--out_dir={tmp_path / 'cut'}", check=False)
    assert cut.returncode != 0 and cut.stderr.strip().count("\n") == 0 and "is not a readable parquet" in cut.stderr
