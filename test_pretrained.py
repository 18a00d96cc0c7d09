"""checkpoints.from_pretrained on small checkpoints written in the released Huginn-0125 layout.

The reference's tensor names and shapes are written out here independently of checkpoints.py's name table
(from the released checkpoint's file list), so a wrong entry in that table fails these tests."""

import json
import math
import os
import sys
import types

import pytest
import torch

from checkpoints import from_pretrained, load_released, pretrained_config, pretrained_folder, released_name
from model import PRESETS, RecurrentConfig, RecurrentGPT

torch.set_num_threads(1)

# config.json of the release (the reference's keys); tiny() overrides the sizes
RELEASED_CONFIG = dict(
    architectures=["RavenForCausalLM"], model_type="huginn_raven", n_embd=5280, n_heads=55, n_layers=8,
    block_size=4096, vocab_size=65536, padding_multiple=4096, tie_embeddings=True, intermediate_size=17920,
    bias=False, architecture_class_name="RecurrentGPT", block_class_name="SandwichBlock",
    norm_class_name="RMSNorm_llama", norm_eps=1e-6, mlp_class_name="GatedMLP", nonlin_name="SiLU",
    init_strategy="takase", init_orthogonal=False, state_init="like-init", injection_type="linear",
    n_layers_in_recurrent_block=4, mean_recurrence=32, sampling_scheme="poisson-lognormal-filling",
    mean_backprop_depth=8, n_layers_in_prelude=2, n_layers_in_coda=2, qk_bias=True,
    activation_checkpoint_impl="per-iteration", rope_base=50000, torch_dtype="bfloat16",
)


def tiny():
    return {**RELEASED_CONFIG, "n_embd": 32, "n_heads": 2, "n_layers": 4, "block_size": 64, "vocab_size": 64,
            "intermediate_size": 48, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
            "n_layers_in_coda": 1, "mean_recurrence": 3, "mean_backprop_depth": 2}


def reference_tensors(c, seed=0):
    """Random tensors under the released names and shapes, incl. the duplicate lm_head and the RoPE buffer."""
    g = torch.Generator().manual_seed(seed)
    h, nh, inter, vocab = c["n_embd"], c["n_heads"], c["intermediate_size"], c["vocab_size"]
    hd = h // nh
    block = {"norm_1.weight": (h,), "attn.Wqkv.weight": (3 * h, h), "attn.qk_bias": (2, 1, nh, hd),
             "attn.proj.weight": (h, h), "norm_2.weight": (h,), "mlp.fc.weight": (2 * inter, h),
             "mlp.proj.weight": (h, inter), "norm_3.weight": (h,), "norm_4.weight": (h,)}
    shapes = {"transformer.wte.weight": (vocab, h), "transformer.adapter.weight": (h, 2 * h),
              "transformer.ln_f.weight": (h,)}
    for group, key in (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
                       ("coda", "n_layers_in_coda")):
        for i in range(c[key]):
            shapes.update({f"transformer.{group}.{i}.{name}": shape for name, shape in block.items()})
    tensors = {name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # the release's second copy
    inv_freq = c["rope_base"] ** -(torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(c["block_size"], dtype=torch.float32), inv_freq)
    tensors["freqs_cis"] = torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]  # (1, T, 1, hd/2, 2)
    return tensors


def write_checkpoint(folder, config, tensors, shards=1):
    """config.json + model.safetensors, or `shards` files with a model.safetensors.index.json."""
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors (pip install safetensors)")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        safetensors_torch.save_file(tensors, os.path.join(folder, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {name: f"model-{i % shards + 1:05d}-of-{shards:05d}.safetensors" for i, name in enumerate(names)}
    for file in set(weight_map.values()):
        safetensors_torch.save_file({n: tensors[n] for n in names if weight_map[n] == file}, os.path.join(folder, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("shards", [1, 3])
def test_every_tensor_lands_where_it_should(tmp_path, shards):
    config, tensors = tiny(), reference_tensors(tiny())
    write_checkpoint(tmp_path, config, tensors, shards)
    model = from_pretrained(str(tmp_path))
    # re-export under the released names: every released tensor (but the RoPE buffer) comes back unchanged
    exported = {released_name(name): t for name, t in model.state_dict().items()}
    assert set(exported) == set(tensors) - {"freqs_cis"}
    for name, t in exported.items():
        assert torch.equal(t, tensors[name]), name
    # ...and (independently of the name table) each module got its own tensor, not a look-alike's
    for ours, released in [(model.wte.weight, "transformer.wte.weight"),
                           (model.prelude[0].norm_1.weight, "transformer.prelude.0.norm_1.weight"),
                           (model.adapter.weight, "transformer.adapter.weight"),
                           (model.core[1].attn.qk_bias, "transformer.core_block.1.attn.qk_bias"),
                           (model.coda[0].mlp.fc.weight, "transformer.coda.0.mlp.fc.weight"),
                           (model.ln_f.weight, "transformer.ln_f.weight")]:
        assert torch.equal(ours, tensors[released]), released
    assert model.lm_head.weight is model.wte.weight  # still tied, so the embedding is counted once
    assert model.get_num_params() == sum(t.numel() for n, t in tensors.items() if n not in ("lm_head.weight",
                                                                                           "freqs_cis"))
    torch.testing.assert_close(model.rope, tensors["freqs_cis"].view_as(model.rope))
    assert not model.training and model.config.mean_recurrence == 3 and model.config.n_head == 2


def test_loaded_model_matches_a_model_built_and_loaded_by_hand(tmp_path):
    """The meta-device build + assign path gives the same logits as a plain model with load_state_dict."""
    config, tensors = tiny(), reference_tensors(tiny(), seed=1)
    write_checkpoint(tmp_path, config, tensors)
    model = from_pretrained(str(tmp_path))
    by_hand = RecurrentGPT(pretrained_config(str(tmp_path))).eval()
    by_hand.load_state_dict({name: tensors[released_name(name)] for name in by_hand.state_dict()})
    by_hand.rope = tensors["freqs_cis"].view_as(by_hand.rope)  # the loader runs with the stored table
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in (1, 3):
            expected, _ = by_hand(idx, num_steps=r, init_scale=0.0)
            logits, _ = model(idx, num_steps=r, init_scale=0.0)
            assert torch.equal(logits, expected)
            assert logits.std() > 0.1  # not a degenerate model


def test_rope_table_is_the_stored_one_even_when_its_last_bits_differ(tmp_path):
    """The released freqs_cis is what the reference runs with. A table computed on another device differs in the
    last bits, which far positions magnify: the fastest frequency moved by one float32 ulp changes the angle at
    position 4,095 by ~5e-4. Such a table is accepted and used as it is; a wrong rope_base is refused."""
    config = {**tiny(), "block_size": 4096}
    tensors = reference_tensors(config)
    hd = config["n_embd"] // config["n_heads"]
    inv_freq = config["rope_base"] ** -(torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    inv_freq[0] = torch.nextafter(inv_freq[0], torch.tensor(2.0))  # one ulp up
    angles = torch.outer(torch.arange(4096, dtype=torch.float32), inv_freq)
    tensors["freqs_cis"] = torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]
    write_checkpoint(tmp_path / "ulp", config, tensors)
    model = from_pretrained(str(tmp_path / "ulp"))
    assert torch.equal(model.rope, tensors["freqs_cis"].view_as(model.rope))
    ours = RecurrentGPT(pretrained_config(str(tmp_path / "ulp"))).rope
    assert (model.rope - ours).abs().max() > 1e-5  # the check the loader used to make would have refused it
    write_checkpoint(tmp_path / "base", {**config, "rope_base": 10000}, reference_tensors(config))
    with pytest.raises(ValueError, match="freqs_cis"):
        from_pretrained(str(tmp_path / "base"))


def test_loads_onto_another_device(tmp_path):
    """The stored RoPE table is read on the CPU, checked there, and moved with the weights (the meta device stands
    in for a GPU here: CI has none)."""
    write_checkpoint(tmp_path, tiny(), reference_tensors(tiny()))
    model = from_pretrained(str(tmp_path), device="meta")
    assert {t.device.type for t in [*model.parameters(), model.rope]} == {"meta"}


def test_loaded_model_is_for_inference(tmp_path):
    """No parameter requires grad: model(idx, num_steps=32) outside torch.no_grad() builds no graph."""
    write_checkpoint(tmp_path, tiny(), reference_tensors(tiny()))
    model = from_pretrained(str(tmp_path))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    logits, _ = model(torch.zeros(1, 5, dtype=torch.long), num_steps=4)
    assert logits.grad_fn is None


def test_bfloat16_load_keeps_rope_in_float32(tmp_path):
    write_checkpoint(tmp_path, tiny(), reference_tensors(tiny()))
    model = from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.dtype == torch.float32  # as the reference keeps freqs_cis


def test_shape_mismatch_names_the_tensor(tmp_path):
    tensors = reference_tensors(tiny())
    tensors["transformer.core_block.1.mlp.fc.weight"] = tensors["transformer.core_block.1.mlp.fc.weight"][:-2]
    write_checkpoint(tmp_path, tiny(), tensors)
    with pytest.raises(ValueError, match=r"transformer\.core_block\.1\.mlp\.fc\.weight has shape \(94, 32\)"):
        from_pretrained(str(tmp_path))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    tensors = reference_tensors(tiny())
    del tensors["transformer.adapter.weight"]
    write_checkpoint(tmp_path / "missing", tiny(), tensors)
    with pytest.raises(KeyError, match=r"transformer\.adapter\.weight"):
        from_pretrained(str(tmp_path / "missing"))
    tensors = {**reference_tensors(tiny()), "transformer.h.0.weight": torch.zeros(3)}
    write_checkpoint(tmp_path / "extra", tiny(), tensors)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.weight"):
        from_pretrained(str(tmp_path / "extra"))
    # a tensor in two shards (which one would win?): named, not loaded
    write_checkpoint(tmp_path / "twice", tiny(), reference_tensors(tiny()), shards=2)
    from safetensors.torch import load_file, save_file
    second = tmp_path / "twice" / "model-00002-of-00002.safetensors"
    save_file({**load_file(second), "transformer.adapter.weight": torch.zeros(32, 64)}, second)
    with pytest.raises(ValueError, match=r"transformer\.adapter\.weight is stored twice"):
        from_pretrained(str(tmp_path / "twice"))


def test_bad_folder_and_unsupported_config(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pretrained_folder(str(tmp_path / "nowhere"))
    # offline: the hub's error spans lines (scripts print one); its first line says why, ours what to do
    def offline(*args, **kwargs):
        raise FileNotFoundError("Got: ConnectError: Name or service not known\nAn error happened while trying to "
                                "locate the files on the Hub")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(OSError) as offline:
        pretrained_folder("huginn-0125")
    assert "\n" not in str(offline.value) and "(Got: ConnectError: Name or service not known)" in str(offline.value)
    assert "give a local copy: a folder with config.json" in str(offline.value)
    # online: the weights (~16 GB) only when asked for; the tokenizer (prepare_data.py) and config.json come without
    asked = []
    hub = types.SimpleNamespace(snapshot_download=lambda repo, allow_patterns: asked.append(allow_patterns) or "snap")
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert pretrained_folder("huginn-0125") == pretrained_folder("huginn-0125", weights=False) == "snap"
    from corpora import released_tokenizer
    with pytest.raises(SystemExit, match="no tokenizer.json at snap"):  # the stand-in hub's folder holds nothing
        released_tokenizer(types.SimpleNamespace(tokenizer="huginn-0125"))
    assert asked == [["*.json", "*.safetensors"], ["*.json"], ["*.json"]]
    os.makedirs(tmp_path / "add")
    with open(tmp_path / "add" / "config.json", "w") as f:
        json.dump({**tiny(), "injection_type": "add"}, f)
    with pytest.raises(ValueError, match="injection_type='add' is not supported"):
        pretrained_config(str(tmp_path / "add"))


def test_a_partial_download_or_a_run_folder_is_named_in_one_line(tmp_path):
    """What the scripts' loader (load_released) says of a shard missing, an index or a config.json cut short, and a
    run folder of train.py given where a released one goes: one line naming the file and what to do (a missing
    shard said "error: 2", a cut JSON file named no file, a run folder's settings were read as a model's config)."""
    def error_of(folder):
        with pytest.raises(SystemExit) as stopped:
            load_released(str(folder), "cpu", torch.float32)
        assert str(stopped.value).startswith("error: ") and "\n" not in str(stopped.value)
        return str(stopped.value)
    write_checkpoint(tmp_path / "shard", tiny(), reference_tensors(tiny()), shards=2)
    os.remove(tmp_path / "shard" / "model-00002-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors is missing (1 of the 2 shards" in error_of(tmp_path / "shard")
    for cut in ("model.safetensors.index.json", "config.json"):
        write_checkpoint(tmp_path / cut, tiny(), reference_tensors(tiny()), shards=2)
        text = (tmp_path / cut / cut).read_text()
        (tmp_path / cut / cut).write_text(text[:len(text) // 2])
        assert f"{tmp_path / cut / cut} does not read as JSON" in error_of(tmp_path / cut)
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"n_embd": 32, "n_head": 4, "out_dir": "run"}))
    assert "is a training run (ckpt.pt), not a model in the released layout: read it with --out_dir" in \
        error_of(tmp_path / "run")


def test_huginn_0125_has_3_564_976_800_parameters(tmp_path):
    """The preset and the released config.json give the same config and the published size (built on meta)."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(RELEASED_CONFIG, f)
    released = pretrained_config(str(tmp_path))
    assert released == RecurrentConfig(**PRESETS["huginn-0125"])
    with torch.device("meta"):
        for config in (RecurrentConfig(**PRESETS["huginn-0125"]), released):
            assert RecurrentGPT(config).get_num_params() == 3_564_976_800
    assert math.isclose(released.norm_eps, 1e-6) and released.rope_base == 50000


# --- sample.py --init_from=<folder in the released layout> ---

SPECIALS = ["<|end_turn|>", "<|end_text|>", "<|begin_text|>", "<|begin_header|>", "<|end_header|>"]


def write_tiny_tokenizer(folder):
    """A character-level tokenizer.json with the release's special tokens; <|end_turn|> is id 0."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (pip install tokenizers)")
    vocab = {t: i for i, t in enumerate(SPECIALS + list("abcdefghijklmnopqrstuvwxyzH ?\n"))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()  # characters back to text without spaces between them
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))


def run_sample(*args):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "sample.py", "--device=cpu", "--num_samples=1", "--max_new_tokens=4",
                           "--temperature=0", "--r=2", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("chat", [True, False])
def test_sample_py_released_layout_prompt_format_and_stop(tmp_path, chat):
    """With ln_f's gain zeroed every logit is 0, so greedy decoding picks id 0 = <|end_turn|> at once:
    the printed sample must be exactly the formatted prompt (the reply is cut at the end token)."""
    tensors = reference_tensors(tiny())
    tensors["transformer.ln_f.weight"].zero_()
    write_checkpoint(tmp_path, tiny(), tensors)
    write_tiny_tokenizer(tmp_path)
    result = run_sample(f"--init_from={tmp_path}", "--start=hi there", *(["--chat"] if chat else []))
    assert result.returncode == 0, result.stderr
    expected = ("<|begin_text|><|begin_header|>user<|end_header|>\n\nhi there<|end_turn|>"
                "<|begin_header|>Huginn<|end_header|>\n\n" if chat else "<|begin_text|>hi there")
    assert f"\n{expected}\n--- sample 1:" in result.stdout, result.stdout


def test_sample_py_released_errors_are_one_line(tmp_path):
    result = run_sample(f"--init_from={tmp_path / 'nowhere'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no such folder" in result.stderr
