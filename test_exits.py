"""exits.py and decode.py's exit rules: one rule object decides alike in decoding and in the offline study, and a
gate fit by cached decoding decodes as it scored. On conftest.cups, a three-cups checkpoint. CPU only."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint
from conftest import play_text
from decode import KL, ConfidentRun, Gate, KVCache, LatentDiff, forward_cached, generate
from model import RecurrentGPT, config_from_preset

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gated(cups, tmp_path_factory):
    """A copy of the cups checkpoint with a gate that exits.py fit beside it, and what exits.py reported."""
    out = tmp_path_factory.mktemp("gated")
    shutil.copy(cups.out / "ckpt.pt", out / "ckpt.pt")
    result = subprocess.run([sys.executable, "exits.py", f"--out_dir={out}", f"--data_dir={cups.data}", "--r=8",
                             "--max_rows=60", "--rounds=2", "--fixed_r=[1,4,8,16]", "--num_threads=1",
                             "--rules={'kl': [1e-3], 'confident-run': [3], 'gate': [0.1, 0.01]}"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "exits.json").read_text()), result.stdout


def test_a_rule_decides_alike_in_decoding_and_offline(gated):
    """A prompt's last token decoded through the cache, every earlier one at every step, stops where the same rule
    stops it on the full forward pass's trajectory: the rule objects are the one implementation of each rule."""
    out, _, _ = gated
    model, _ = load_checkpoint(str(out))
    gate = model.exit_gate
    idx = torch.tensor([[0] + [1 + int(c) for c in "4402"]])  # "\n4402" in the cups vocabulary
    T, r = idx.size(1), 8
    rules = [KL(1e-2), LatentDiff(0.05), ConfidentRun(2), Gate(0.1, gate["net"], gate["mean"], gate["std"])]
    with torch.no_grad():
        rope, noise = model.rope[:T], torch.zeros(1, T, model.config.n_embd)
        e = model.embed(idx, rope)
        trajectory = [(s[0, -1], F.log_softmax(model.predict(s, rope)[0, -1:].float(), -1))
                      for s in model.iterate(noise, e, rope, r)]
        for rule in rules:
            rule.start(noise[:, -1])
            offline = next((step for step, (s, lp) in enumerate(trajectory, 1) if rule.done(step, s[None], lp)), r)
            cache = KVCache(model, 1, T, r)
            forward_cached(model, idx[:, :-1], cache, r, noise)
            _, _, steps = forward_cached(model, idx[:, -1:], cache, r, noise, rule=rule)
            assert int(steps) == offline, type(rule).__name__
            assert offline < r or isinstance(rule, LatentDiff)  # most of them really stop early here


def test_the_gate_fit_where_it_is_used_scores_alike_both_ways(gated):
    """exits.py's table: the gate's accuracy by cached decoding within 0.01 of the offline one; fixed r rises with r."""
    out, report, printed = gated
    rows = {(row["rule"], row["threshold"]): row for row in report["table"]}
    for threshold in (0.1, 0.01):
        gate = rows[("gate", threshold)]
        assert abs(gate["cached"]["accuracy"] - gate["offline"]["accuracy"]) <= 0.01, gate
        assert 1 <= gate["cached"]["steps"] <= 8
    assert rows[("fixed r", 8)]["cached"]["accuracy"] > rows[("fixed r", 1)]["cached"]["accuracy"] + 0.2
    assert "gate round 2" in printed and (out / "exit_gate.pt").is_file()
    assert "fixed_r above r = 8 left out: [16]" in printed and ("fixed r", 16) not in rows  # r = 8 is the most


def test_generate_uses_the_gate_beside_the_checkpoint(gated):
    out, _, _ = gated
    model, _ = load_checkpoint(str(out))  # finds exit_gate.pt
    _, stats = generate(model, torch.tensor([[0, 1, 2, 3]]), 6, num_steps=8, temperature=0, exit_criterion="gate",
                        exit_threshold=0.5)
    assert stats["steps"].float().mean() < 8
    del model.exit_gate
    with pytest.raises(ValueError, match="no exit gate"):
        generate(model, torch.tensor([[0, 1]]), 2, exit_criterion="gate")
    # trained on (or trained again) after the gate was fit: the gate is not used with the new weights
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    torch.save({**checkpoint, "iter_num": checkpoint["iter_num"] + 1}, out / "ckpt.pt")
    try:
        assert not hasattr(load_checkpoint(str(out))[0], "exit_gate")
    finally:
        torch.save(checkpoint, out / "ckpt.pt")


def test_a_small_val_split_is_not_fit_and_scored_on_the_same_rows(tmp_path):
    """Text data: exits.py reads train.py's evaluation blocks, each once. A val split with fewer blocks than
    eval_iters x batch_size gave repeated blocks side by side, so the gate was scored on the rows it was fit on."""
    (tmp_path / "play.txt").write_text(play_text(5_000))
    subprocess.run([sys.executable, "prepare_data.py", "shakespeare_char", f"--input={tmp_path / 'play.txt'}",
                    f"--out_dir={tmp_path / 'data'}"], cwd=REPO, env=ENV, check=True, capture_output=True)
    val = tmp_path / "data" / "val.bin"
    val.write_bytes(val.read_bytes()[:2 * 40])  # 40 tokens: 8 blocks of 32
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    model = RecurrentGPT(config_from_preset("tiny", vocab_size=meta["vocab_size"], block_size=32))
    (tmp_path / "out").mkdir()
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "meta": meta,
                "config": {"dataset": "shakespeare_char", "data_dir": str(tmp_path / "data"), "block_size": 32,
                           "batch_size": 8, "eval_iters": 2, "seed": 0},  # 16 evaluation blocks asked for
                "iter_num": 1, "best_val_loss": 1.0, "optimizer": {}}, tmp_path / "out" / "ckpt.pt")
    result = subprocess.run([sys.executable, "exits.py", f"--out_dir={tmp_path / 'out'}", "--r=2", "--rounds=1",
                             "--fixed_r=[2]", "--rules={}", "--epochs=1", "--num_threads=1"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the gate fit on 4, scored on 4" in result.stdout, result.stdout  # 8 and 8 of 8 distinct blocks
