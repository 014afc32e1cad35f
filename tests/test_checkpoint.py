"""Checkpoint I/O: load what transformers writes, write what transformers loads, fail loudly on mismatches."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import hf_logits, image_batch, make_hf_qwen2_checkpoint, max_diff_on_valid
from jaxvlm import models
from jaxvlm.models.checkpoint import CheckpointTensors, SafetensorsFile, save_safetensors

ATOL = 1e-4
BATCH = image_batch([0, 1, 2], [[1, 6, 6], [1, 12, 10], [1, 4, 4]], seed=3)


def _ours(model, params, batch):
    return model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_tensors(path, edit):
    """Apply edit(dict name -> array) to a single-file checkpoint in place."""
    file = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    save_safetensors(tensors, file)


@pytest.mark.parametrize("name", ["gqa2_tied_win56", "gqa6_untied_win112"])
def test_export_round_trip_through_transformers(hf_checkpoints, tmp_path, name):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch_model, path = hf_checkpoints[name]
    model, params = models.load_pretrained(path)
    models.save_pretrained(model, params, str(tmp_path / "export"))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    ref = hf_logits(torch_model, BATCH)
    assert max_diff_on_valid(hf_logits(reloaded, BATCH), ref, BATCH["attention_mask"]) < ATOL
    # ... and back into jaxvlm: the same tensors.
    _, again = models.load_pretrained(str(tmp_path / "export"))
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.slow
def test_randomly_initialised_model_exports_to_transformers(tmp_path):
    """A model born in jaxvlm (init_params) is a valid transformers checkpoint with the same logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = models.preset("tiny").replace(
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293
    )
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=300))
    model, params = models.Qwen25VL(cfg), models.init_params(cfg, 1)

    # Rescale kernels from std 0.02 to 1/sqrt(fan_in) and the embedding to std 1, so activations are O(1).
    def rescale(path, x):
        name = path[-1].key
        if name == "embedding":
            return x * 50
        return x / (0.02 * x.shape[-2] ** 0.5) if name == "kernel" else x

    params = jax.tree_util.tree_map_with_path(rescale, params)
    models.save_pretrained(model, params, str(tmp_path))
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ours = _ours(model, params, BATCH)
    assert max_diff_on_valid(ours, hf_logits(torch_model, BATCH), BATCH["attention_mask"]) < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_text_only_qwen2_checkpoint(tmp_path, tie):
    import torch
    from transformers import Qwen2ForCausalLM

    torch_model = make_hf_qwen2_checkpoint(str(tmp_path / "hf"), seed=2, tie=tie)
    model, params = models.load_pretrained(str(tmp_path / "hf"))
    assert model.config.model_type == "qwen2" and model.config.vision is None
    assert model.config.tie_word_embeddings == tie
    ids = np.random.default_rng(0).integers(0, 300, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding: transformers then needs explicit positions
    mask[2, :7] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_valid(ours, ref, mask) < ATOL
    models.save_pretrained(model, params, str(tmp_path / "export"))
    reloaded = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        again = reloaded(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()
    assert max_diff_on_valid(again, ref, mask) < ATOL


def test_flat_hub_config_form(hf_checkpoints, tmp_path):
    """Older hub checkpoints keep text fields at the root with rope_scaling {type: mrope}."""
    torch_model, path = hf_checkpoints["gqa6_untied_win112"]
    path = _copy(path, tmp_path / "flat")
    with open(os.path.join(path, "config.json")) as f:
        nested = json.load(f)
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **{k: v for k, v in text.items() if k != "model_type"}}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(flat, f)
    model, params = models.load_pretrained(path)
    assert model.config.text.mrope_section == tuple(rope["mrope_section"])
    ref = hf_logits(torch_model, BATCH)
    assert max_diff_on_valid(_ours(model, params, BATCH), ref, BATCH["attention_mask"]) < ATOL


def test_sharded_checkpoint_round_trip(hf_checkpoints, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch_model, path = hf_checkpoints["gqa2_tied_win56"]
    model, params = models.load_pretrained(path)
    out = str(tmp_path / "sharded")
    models.save_pretrained(model, params, out, max_shard_bytes=20_000)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    _, again = models.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    assert max_diff_on_valid(hf_logits(reloaded, BATCH), hf_logits(torch_model, BATCH), BATCH["attention_mask"]) < ATOL


@pytest.mark.slow
def test_bfloat16_load_and_save(hf_checkpoints, tmp_path):
    _, path = hf_checkpoints["gqa2_tied_win56"]
    model32, params32 = models.load_pretrained(path)
    model, params = models.load_pretrained(path, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    logits = _ours(model, params, BATCH)
    assert logits.dtype == jnp.bfloat16
    ref = _ours(model32, params32, BATCH)
    mask = BATCH["attention_mask"].astype(bool)
    rel = np.abs(np.asarray(logits, np.float32) - np.asarray(ref))[mask].mean() / np.abs(np.asarray(ref))[mask].mean()
    assert rel < 0.05
    models.save_pretrained(model, params, str(tmp_path / "bf16"))
    header = CheckpointTensors(str(tmp_path / "bf16"))
    assert {header.files[f].header[n]["dtype"] for n, f in header.where.items()} == {"BF16"}
    _, again = models.load_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["gqa2_tied_win56"][1], tmp_path / "missing")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        models.CheckpointMismatchError, match=r"missing tensors \(1\): model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        models.load_pretrained(path)


def test_misshaped_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["gqa2_tied_win56"][1], tmp_path / "misshaped")

    def edit(t):
        t["visual.blocks.2.mlp.up_proj.weight"] = np.zeros((7, 32), np.float32)

    _rewrite_tensors(path, edit)
    with pytest.raises(
        models.CheckpointMismatchError,
        match=r"visual\.blocks\.2\.mlp\.up_proj\.weight: checkpoint \[7, 32\] vs model \[48, 32\]",
    ):
        models.load_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["gqa2_tied_win56"][1], tmp_path / "unexpected")
    _rewrite_tensors(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}))
    with pytest.raises(
        models.CheckpointMismatchError, match=r"unexpected tensors \(1\): model\.layers\.2\.mlp\.up_proj\.weight"
    ):
        models.load_pretrained(path)


def test_unsupported_or_broken_checkpoints_fail_clearly(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type='llava' is not supported"):
        models.load_pretrained(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"model_type": "qwen2",\n "vocab_size": }')
    with pytest.raises(ValueError, match=r"config.json: invalid JSON at line 2"):
        models.load_pretrained(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_pretrained(str(tmp_path / "nowhere"))


def test_transformers5_in_memory_names_are_accepted(hf_checkpoints, tmp_path):
    """Checkpoints written with the `model.language_model.*` / `model.visual.*` names load too."""
    path = _copy(hf_checkpoints["gqa2_tied_win56"][1], tmp_path / "v5names")
    _, want = models.load_pretrained(path)

    def rename(t):
        for k in list(t):
            if k.startswith("visual."):
                t["model." + k] = t.pop(k)
            elif k.startswith("model."):
                t["model.language_model." + k[len("model.") :]] = t.pop(k)

    _rewrite_tensors(path, rename)
    _, got = models.load_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ---------------------------------------------------------------------------------------------------------------
# dtype options: names, aliases and numpy / JAX dtypes, one canonical name in the config

DTYPE_FORMS = [
    ("bfloat16", "bfloat16"),
    ("bf16", "bfloat16"),
    (jnp.bfloat16, "bfloat16"),
    (jnp.dtype("bfloat16"), "bfloat16"),
    (ml_dtypes.bfloat16, "bfloat16"),
    ("float32", "float32"),
    ("fp32", "float32"),
    (np.float32, "float32"),
    (jnp.float32, "float32"),
    (np.dtype("float32"), "float32"),
    (np.float16, "float16"),
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny preset with random weights, written by save_pretrained in float32 (no torch needed)."""
    cfg = models.preset("tiny")
    path = str(tmp_path_factory.mktemp("tiny_checkpoint"))
    models.save_pretrained(models.Qwen25VL(cfg), models.init_params(cfg, 0), path)
    return path


@pytest.mark.parametrize("form, name", DTYPE_FORMS, ids=[repr(form) for form, _ in DTYPE_FORMS])
def test_load_pretrained_takes_dtype_names_aliases_and_dtypes(tiny_checkpoint, form, name):
    model, params = models.load_pretrained(tiny_checkpoint, dtype=form)
    assert model.config.dtype == model.config.param_dtype == name
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(name)}
    by_name, _ = models.load_pretrained(tiny_checkpoint, dtype=name)
    assert model.config == by_name.config and hash(model.config) == hash(by_name.config)


def test_load_pretrained_param_dtype_forms(tiny_checkpoint):
    # np.dtype("float32") is falsy (len 0): it must still be taken as the param dtype, not replaced by `dtype`.
    for param_dtype in (np.dtype("float32"), np.float32, "fp32"):
        model, params = models.load_pretrained(tiny_checkpoint, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert (model.config.dtype, model.config.param_dtype) == ("bfloat16", "float32")
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_preset_model_config_and_save_pretrained_normalise_dtypes(tiny_checkpoint, tmp_path):
    by_name = models.preset("tiny", dtype="bfloat16", param_dtype="float32")
    assert models.preset("tiny", dtype=jnp.bfloat16, param_dtype=np.float32) == by_name
    assert models.preset("tiny", dtype="bf16", param_dtype=jnp.dtype("float32")) == by_name
    assert models.ModelConfig(dtype=jnp.float16).dtype == by_name.replace(dtype=np.float16).dtype == "float16"
    assert len({by_name, models.preset("tiny", dtype=ml_dtypes.bfloat16, param_dtype="fp32")}) == 1
    model, params = models.load_pretrained(tiny_checkpoint)
    models.save_pretrained(model, params, str(tmp_path), dtype=jnp.bfloat16)
    header = CheckpointTensors(str(tmp_path))
    assert {header.files[f].header[n]["dtype"] for n, f in header.where.items()} == {"BF16"}
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "argument, value",
    [
        ("dtype", "bfloat"),
        ("dtype", "BF16"),
        ("dtype", jnp.int8),
        ("dtype", float),
        ("param_dtype", "int8"),
        ("param_dtype", np.int32),
        ("param_dtype", object()),
    ],
)
def test_unsupported_dtype_is_rejected_naming_the_argument(tiny_checkpoint, argument, value):
    message = rf"^{argument}=.* is not a supported dtype.*'float32', 'bfloat16', 'float16', 'float64'.*'bf16'"
    with pytest.raises(ValueError, match=message):
        models.load_pretrained(tiny_checkpoint, **{argument: value})
    with pytest.raises(ValueError, match=message):
        models.preset("tiny", **{argument: value})
    with pytest.raises(ValueError, match=message):
        models.ModelConfig(**{argument: value})
