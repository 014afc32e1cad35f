"""Checkpoint I/O: load what transformers writes, write what transformers loads, fail loudly on mismatches."""

import dataclasses
import json
import os
import re
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
    assert {header.dtype(n) for n in header.names()} == {"BF16"}
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
    with pytest.raises(models.CheckpointError, match=r'config\.json: model_type: "llava" is not supported'):
        models.load_pretrained(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"model_type": "qwen2",\n "vocab_size": }')
    with pytest.raises(models.CheckpointError, match=r"config.json: invalid JSON at line 2"):
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
    assert {header.dtype(n) for n in header.names()} == {"BF16"}
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


# ---------------------------------------------------------------------------------------------------------------
# safetensors files: the header is checked against the file when it is opened (the format's rules: safetensors'
# README and its reference reader's Metadata::validate), and every error names the file and the tensor

A = np.arange(6, dtype="<f4").reshape(2, 3)
B = np.array(7, dtype="<i8")
TWO_TENSORS = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]},
}
TWO_DATA = A.tobytes() + B.tobytes()


def _raw_safetensors(path, header, data: bytes = TWO_DATA, length: int | None = None) -> str:
    """Write a .safetensors file from a header (a dict, or the raw JSON bytes) and data bytes; `length` replaces the
    8-byte header length."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(np.uint64(len(blob) if length is None else length).tobytes() + blob + data)
    return str(path)


def _edited(edit) -> dict:
    header = json.loads(json.dumps(TWO_TENSORS))
    edit(header)
    return header


MALFORMED_HEADERS = {
    "missing field": (
        _edited(lambda h: h["a"].pop("shape")),
        r"tensor 'a': header entry must have exactly \['dtype', 'shape', 'data_offsets'\] \(missing \['shape'\]\)",
    ),
    "extra field": (_edited(lambda h: h["b"].update(crc=1)), r"tensor 'b': .* \(unexpected \['crc'\]\)"),
    "entry not an object": (_edited(lambda h: h.update(a=[1, 2])), r"tensor 'a': header entry must be an object"),
    "unknown dtype": (_edited(lambda h: h["a"].update(dtype="F33")), r"tensor 'a': unknown dtype 'F33'"),
    "dtype not a string": (_edited(lambda h: h["a"].update(dtype=32)), r"tensor 'a': unknown dtype 32"),
    "float in shape": (_edited(lambda h: h["a"].update(shape=[2.0, 3])), r"'a': shape must be a list of non-neg"),
    "negative shape": (_edited(lambda h: h["a"].update(shape=[-2, -3])), r"'a': shape must be a list of non-neg"),
    "bool in shape": (_edited(lambda h: h["a"].update(shape=[True, 3])), r"'a': shape must be a list of non-neg"),
    "three offsets": (_edited(lambda h: h["a"].update(data_offsets=[0, 24, 24])), r"'a': data_offsets must be two"),
    "string offsets": (_edited(lambda h: h["b"].update(data_offsets="24:32")), r"'b': data_offsets must be two"),
    "reversed offsets": (
        _edited(lambda h: h["a"].update(data_offsets=[24, 0])),
        r"'a': data_offsets \[24, 0\] end before they begin",
    ),
    "dtype of another width": (
        _edited(lambda h: h["a"].update(dtype="F16")),
        r"tensor 'a': data_offsets \[0, 24\] hold 24 bytes, but F16 of shape \[2, 3\] needs 12",
    ),
    "shape of another size": (
        _edited(lambda h: h["a"].update(shape=[3, 3])),
        r"tensor 'a': data_offsets \[0, 24\] hold 24 bytes, but F32 of shape \[3, 3\] needs 36",
    ),
    "sub-byte remainder": (
        _edited(lambda h: h["a"].update(dtype="F4", shape=[3], data_offsets=[0, 2])),
        r"tensor 'a': F4 \[3\] is 12 bits, not a whole number of bytes",
    ),
    "shifted offsets overlap": (
        _edited(lambda h: h["b"].update(data_offsets=[16, 24])),
        r"tensor 'b' \(data bytes \[16, 24\)\) overlaps tensor 'a', which ends at 24",
    ),
    "offsets past the data": (
        _edited(lambda h: h["b"].update(data_offsets=[32, 40])),
        r"tensor 'b' needs data bytes \[32, 40\), but the file \(\d+ bytes\) holds only 32 data bytes: the file is "
        r"truncated",
    ),
    "metadata value not a string": (
        _edited(lambda h: h.update(__metadata__={"format": 1})),
        r"__metadata__ must map strings to strings, got \{'format': 1\}",
    ),
    "metadata a list": (_edited(lambda h: h.update(__metadata__=["pt"])), r"__metadata__ must map strings to strings"),
    "duplicate key": (
        b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"I64","shape":[],"data_offsets":[24,32]'
        b'},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}',
        r"corrupt safetensors header \(duplicate key 'a'\)",
    ),
    "NaN": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,24]}}', r"corrupt safetensors header \(NaN is not"),
    "lone surrogate": (b'{"\\ud800":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}', r"is not Unicode text"),
    "not UTF-8": (b'{"a\xff":{"dtype":"I64","shape":[],"data_offsets":[0,8]}}', r"header: not UTF-8 at byte 11"),
    "not JSON": (b'{"a": {"dtype": "F32", "shape": [2, 3], "data_off', r"corrupt safetensors header \(Unterminated"),
    "leading space": (
        b' {"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}',
        r"it must start with '\{', got b' \{",
    ),
    "a JSON list": (b'[{"a":{"dtype":"F32"}}]', r"it must start with '\{', got b'\["),
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
def test_malformed_safetensors_headers_are_named(tmp_path, case):
    header, message = MALFORMED_HEADERS[case]
    path = _raw_safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(models.CheckpointError, match=re.escape(path) + ": " + ".*" + message):
        SafetensorsFile(path)


@pytest.mark.parametrize(
    "data, length, message",
    [
        (
            TWO_DATA[:29],
            None,
            r"tensor 'b' needs data bytes \[24, 32\), but the file \(\d+ bytes\) holds only 29 data ",
        ),
        (TWO_DATA[:20], None, r"tensor 'a' needs data bytes \[0, 24\), but .* holds only 20 data bytes: the file is"),
        (TWO_DATA + b"\0" * 8, None, r"8 bytes after the last tensor \('b', ending at 32\) belong to no tensor"),
        (TWO_DATA, 10**9, r"header length 1000000000 exceeds the safetensors limit of 100000000 bytes"),
        (TWO_DATA, 2**64 - 1, r"header length 18446744073709551615 exceeds the safetensors limit"),
        (b"", 99_000_000, r"header length 99000000 runs past the end of the file \(\d+ bytes\): the file is truncated"),
        (TWO_DATA, 3, r"corrupt safetensors header \(Unterminated string"),
    ],
    ids=["truncated in b", "truncated in a", "trailing bytes", "huge length", "u64 max", "length past end", "short"],
)
def test_file_and_header_lengths_are_checked(tmp_path, data, length, message):
    path = _raw_safetensors(tmp_path / "x.safetensors", TWO_TENSORS, data, length=length)
    with pytest.raises(models.CheckpointError, match=re.escape(path) + ": " + message):
        SafetensorsFile(path)


def test_a_hole_in_the_data_section_is_named(tmp_path):
    header = _edited(lambda h: h["b"].update(data_offsets=[32, 40]))
    path = _raw_safetensors(tmp_path / "x.safetensors", header, TWO_DATA + b"\0" * 8)
    with pytest.raises(models.CheckpointError, match=r"data bytes \[24, 32\) before tensor 'b' belong to no tensor"):
        SafetensorsFile(path)


def test_files_shorter_than_the_length_field_are_named(tmp_path):
    for size in (0, 7):
        (tmp_path / "x.safetensors").write_bytes(b"\1" * size)
        with pytest.raises(models.CheckpointError, match=rf"x\.safetensors: not a safetensors file \({size} bytes"):
            SafetensorsFile(str(tmp_path / "x.safetensors"))


def test_valid_edge_cases_read_what_the_reference_reader_reads(tmp_path):
    """Scalars, empty tensors (sharing an offset), entries out of offset order, null metadata and a space-padded
    header are valid safetensors: read as the `safetensors` package reads them, and it reads ours."""
    import safetensors.numpy

    header = {
        "__metadata__": None,
        "z": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "empty": {"dtype": "BF16", "shape": [4, 0], "data_offsets": [24, 24]},
        "also_empty": {"dtype": "I8", "shape": [0], "data_offsets": [24, 24]},
        "a_scalar": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]},
    }
    blob = json.dumps(header).encode() + b"   "
    path = _raw_safetensors(tmp_path / "edge.safetensors", blob)
    ours = SafetensorsFile(path)
    reference = safetensors.numpy.load_file(path)
    assert sorted(ours.keys()) == sorted(reference) and ours.metadata == {}
    for name, want in reference.items():
        got = ours.get(name)
        assert got.shape == want.shape and got.dtype.itemsize == want.dtype.itemsize and got.tobytes() == want.tobytes()
    assert ours.dtype("empty") == "BF16" and ours.get("empty").dtype == ml_dtypes.bfloat16
    arrays = {"w": np.arange(12, dtype=np.float16).reshape(3, 4), "s": np.array(True), "e": np.zeros((0, 2), np.int32)}
    save_safetensors(arrays, str(tmp_path / "ours.safetensors"), metadata={"format": "np"})
    again = safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))
    for name, array in arrays.items():
        np.testing.assert_array_equal(again[name], array)
        assert again[name].dtype == array.dtype


def test_same_width_dtype_relabel_loads_as_a_file_but_not_as_weights(tiny_checkpoint, tmp_path):
    """F32 -> I32 keeps every size: the file is valid (no reader can tell), but no weight is an integer, so
    load_pretrained names the tensor and its dtype."""
    path = _copy(tiny_checkpoint, tmp_path / "relabelled")
    file = os.path.join(path, "model.safetensors")
    raw = bytearray(open(file, "rb").read())
    n = int(np.frombuffer(raw[:8], "<u8")[0])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "I32"
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))
    raw[8 : 8 + n] = blob
    open(file, "wb").write(bytes(raw))
    assert SafetensorsFile(file).get("model.norm.weight").dtype == np.int32
    message = r"tensors of a dtype that is no weight's \(1; weights are F16, BF16, F32, F64\): model\.norm\.weight: I32"
    with pytest.raises(models.CheckpointMismatchError, match=message + r" in model\.safetensors"):
        models.load_pretrained(path)


def test_truncated_download_names_the_file_and_the_tensor(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path / "truncated")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(models.CheckpointError, match=re.escape(file) + r": tensor '.*' needs data bytes .* truncated"):
        models.load_pretrained(path)


def test_a_tensor_under_both_of_its_names_is_an_error(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path / "twice")
    _rewrite_tensors(path, lambda t: t.update({"model.language_model.norm.weight": t["model.norm.weight"]}))
    with pytest.raises(models.CheckpointError, match=r"holds 'model\.norm\.weight' twice"):
        models.load_pretrained(path)


def test_a_config_of_a_far_larger_model_is_named_before_it_is_traced(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path / "deep")
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config["text_config"]["num_hidden_layers"] = 2**31 - 1  # valid on its own: 2 billion layers
    open(os.path.join(path, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(models.CheckpointMismatchError, match=r"the config describes a model of [\d,]+ parameters, but"):
        models.load_pretrained(path)


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sharded"))
    model, params = models.load_pretrained(tiny_checkpoint)
    models.save_pretrained(model, params, path, max_shard_bytes=200_000)
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    return path


def _edit_index(path, edit) -> None:
    file = os.path.join(path, "model.safetensors.index.json")
    index = json.loads(open(file).read())
    edit(index)
    open(file, "w").write(json.dumps(index))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda i: i["weight_map"].update({"model.norm.weight": "model-09-of-09.safetensors"}),
            r"weight_map maps 'model\.norm\.weight' "
            r"to shard 'model-09-of-09\.safetensors', which is not in",
        ),
        (
            lambda i: i["weight_map"].update({"model.norm.weight": "../model.safetensors"}),
            r"weight_map\['model\.norm\.weig"
            r"ht'\] must be the file name of a shard in the directory, got '\.\./model\.safetensors'",
        ),
        (
            lambda i: i["weight_map"].update({"model.norm.weight": 3}),
            r"weight_map\['model\.norm\.weight'\] must be the",
        ),
        (lambda i: i.update(weight_map=[]), r"must be a JSON object with a \"weight_map\" object"),
        (lambda i: i.pop("weight_map"), r"must be a JSON object with a \"weight_map\" object"),
        (
            lambda i: i["weight_map"].pop("model.norm.weight"),
            r"shard model-0000\d-of-0000\d\.safetensors holds tensors "
            r"the weight_map does not map to it \(1\): 'model\.norm\.weight'",
        ),
    ],
    ids=["missing shard", "path outside", "not a string", "weight_map a list", "no weight_map", "unlisted tensor"],
)
def test_shard_index_is_checked_against_the_shards(sharded_checkpoint, tmp_path, edit, message):
    path = _copy(sharded_checkpoint, tmp_path / "sharded")
    _edit_index(path, edit)
    index = re.escape(os.path.join(path, "model.safetensors.index.json"))
    with pytest.raises(models.CheckpointError, match=index + ": " + message):
        models.load_pretrained(path)


def test_shard_index_naming_a_tensor_its_shard_lacks(sharded_checkpoint, tmp_path):
    path = _copy(sharded_checkpoint, tmp_path / "sharded")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    other = next(file for file in sorted(set(weight_map.values())) if file != weight_map["model.norm.weight"])
    _edit_index(path, lambda i: i["weight_map"].update({"model.norm.weight": other}))
    with pytest.raises(models.CheckpointError, match=rf"maps 'model\.norm\.weight' to {re.escape(other)}, but that"):
        models.load_pretrained(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": {')
    with pytest.raises(models.CheckpointError, match=r"model\.safetensors\.index\.json: not a JSON index"):
        models.load_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# config.json: every field jaxvlm reads is checked for type and range, errors name the file and the field's path

# Qwen2.5-VL-3B-Instruct's and -7B-Instruct's config.json as published (transformers 4.x: flat text fields), and
# Qwen2.5-0.5B-Instruct's (text-only qwen2).
QWEN2_5_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
QWEN2_5_VL_7B = {
    **QWEN2_5_VL_3B,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "vision_config": {**QWEN2_5_VL_3B["vision_config"], "out_hidden_size": 3584},
}
QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
DELETE = object()


def _with(config: dict, path: str, value) -> dict:
    """A deep copy of `config` with the field at dotted `path` set to `value` (DELETE removes it)."""
    config = json.loads(json.dumps(config))
    *parents, key = path.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    if value is DELETE:
        del section[key]
    else:
        section[key] = value
    return config


def test_published_configs_load_as_the_presets():
    from jaxvlm.models.config import PRESETS, from_hf_dict, to_hf_dict

    cfg = from_hf_dict(QWEN2_5_VL_3B)
    text = dataclasses.replace(PRESETS["qwen2_5_vl_3b"].text, bos_token_id=151643, eos_token_id=151645)
    assert cfg == PRESETS["qwen2_5_vl_3b"].replace(text=text)
    seven = from_hf_dict(QWEN2_5_VL_7B)
    assert (seven.text.hidden_size, seven.text.num_key_value_heads, seven.vision.out_hidden_size) == (3584, 4, 3584)
    assert not seven.tie_word_embeddings and seven.text.mrope_section == (16, 24, 24)
    lm = from_hf_dict(QWEN2_5_0_5B)
    assert lm.vision is None and lm.text.mrope_section is None and lm.text.resolved_head_dim == 64
    for name, preset in PRESETS.items():  # and the transformers-5 form save_pretrained writes
        assert from_hf_dict(json.loads(json.dumps(to_hf_dict(preset)))) == preset, name


def test_null_fields_mean_what_they_mean_to_transformers():
    from jaxvlm.models.config import from_hf_dict

    cfg = from_hf_dict(_with(_with(QWEN2_5_0_5B, "num_key_value_heads", None), "head_dim", None))
    assert cfg.text.num_key_value_heads == 14 and cfg.text.head_dim == 0
    cfg = from_hf_dict(_with(_with(QWEN2_5_VL_3B, "eos_token_id", [151645, 151643]), "bos_token_id", None))
    assert cfg.text.eos_token_id == (151645, 151643) and cfg.text.bos_token_id is None
    assert from_hf_dict(_with(QWEN2_5_0_5B, "head_dim", 64)).text.head_dim == 64


CONFIG_ERRORS = [
    ("vision_config.depth", 0, "vision_config.depth: must be a positive integer, got 0"),
    ("num_attention_heads", 0, "num_attention_heads: must be a positive integer, got 0"),
    ("hidden_size", 64.5, "hidden_size: must be a positive integer, got 64.5"),
    ("hidden_size", 2048.0, "hidden_size: must be a positive integer, got 2048.0"),
    ("hidden_size", "2048", 'hidden_size: must be a positive integer, got "2048"'),
    ("num_hidden_layers", True, "num_hidden_layers: must be a positive integer, got true"),
    ("vocab_size", -5, "vocab_size: must be a positive integer, got -5"),
    ("vocab_size", 2**31, "vocab_size: must be at most 2147483647, got 2147483648"),
    ("intermediate_size", None, "intermediate_size: must be a positive integer, got null"),
    ("intermediate_size", DELETE, "intermediate_size: missing"),
    ("num_key_value_heads", 0, "num_key_value_heads: must be a positive integer, got 0"),
    ("num_key_value_heads", 3, "num_key_value_heads: 3 does not divide num_attention_heads=16"),
    (
        "num_attention_heads",
        24,
        "hidden_size: 2048 is not divisible by num_attention_heads=24 (and no head_dim is given)",
    ),
    (
        "hidden_size",
        2064,
        "hidden_size: the head dimension (hidden_size / num_attention_heads = 2064 / 16 = 129) must be even for RoPE",
    ),
    (
        "hidden_size",
        1536,
        "rope_scaling.mrope_section: [16, 24, 24] sums to 64, but must sum to half the head dimension "
        "(hidden_size / num_attention_heads = 1536 / 16 = 96), 48",
    ),
    (
        "rope_scaling.mrope_section",
        [16, 24, "24"],
        'rope_scaling.mrope_section[2]: must be a non-negative integer, got "24"',
    ),
    ("rope_scaling.mrope_section", 64, "rope_scaling.mrope_section: must be a list of integers, got 64"),
    ("rope_scaling.type", "yarn", 'rope_scaling.type: "yarn" is not supported (supported: default, mrope)'),
    ("rope_scaling", "mrope", 'rope_scaling: must be a JSON object, got "mrope"'),
    ("rope_theta", 0, "rope_theta: must be a positive finite number, got 0"),
    ("rms_norm_eps", "1e-6", 'rms_norm_eps: must be a positive finite number, got "1e-6"'),
    ("rms_norm_eps", float("nan"), "rms_norm_eps: must be a positive finite number, got NaN"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps: must be a positive finite number, got Infinity"),
    ("rope_theta", 1e300, "rope_theta: must be at most 3.402823e+38 (it is used in float32), got 1e+300"),
    ("tie_word_embeddings", 1, "tie_word_embeddings: must be true or false, got 1"),
    ("use_sliding_window", True, "use_sliding_window: true is not supported (jaxvlm attends over the whole sequence)"),
    (
        "hidden_act",
        "relu",
        "hidden_act: must be one of ['silu', 'gelu', 'gelu_pytorch_tanh', 'quick_gelu'], got \"relu\"",
    ),
    ("image_token_id", -1, "image_token_id: must be a non-negative integer, got -1"),
    ("eos_token_id", [151645, "x"], 'eos_token_id[1]: must be a non-negative integer, got "x"'),
    ("bos_token_id", 1.5, "bos_token_id: must be a non-negative integer, got 1.5"),
    ("text_config", [1], "text_config: must be a JSON object, got [1]"),
    ("vision_config", DELETE, "vision_config: must be a JSON object, got nothing"),
    (
        "vision_config.num_heads",
        3,
        "vision_config.hidden_size: 1280 / vision_config.num_heads=3 must give a head dimension divisible by 4",
    ),
    (
        "vision_config.window_size",
        100,
        "vision_config.window_size: 100 is not a multiple of vision_config.patch_size * "
        "vision_config.spatial_merge_size = 14 * 2 = 28",
    ),
    (
        "vision_config.window_size",
        28 * 1000,
        "vision_config.window_size: 28000 gives windows of 4000000 patches (at most 65536)",
    ),
    (
        "vision_config.fullatt_block_indexes",
        [7, 32],
        "vision_config.fullatt_block_indexes[1]: 32 is out of range for vision_config.depth=32",
    ),
    (
        "vision_config.fullatt_block_indexes",
        {"0": 7},
        'vision_config.fullatt_block_indexes: must be a list of integers, got {"0": 7}',
    ),
    (
        "vision_config.out_hidden_size",
        1024,
        "vision_config.out_hidden_size: 1024 must equal hidden_size=2048 (the merger projects into the text embedding)",
    ),
    ("vision_config.in_chans", 3.0, "vision_config.in_chans: must be a positive integer, got 3.0"),
    ("vision_config.tokens_per_second", "2", 'vision_config.tokens_per_second: must be a positive integer, got "2"'),
    (
        "model_type",
        "qwen2_vl",
        'model_type: "qwen2_vl" is not supported (jaxvlm loads "qwen2_5_vl", "qwen3_vl", "qwen2", "qwen3", "llama" '
        "checkpoints)",
    ),
]


@pytest.mark.parametrize(
    "path, value, message",
    CONFIG_ERRORS,
    ids=[f"{p}=<deleted>" if v is DELETE else f"{p}={v!r}" for p, v, _ in CONFIG_ERRORS],  # stable for xdist
)
def test_config_errors_name_the_file_and_the_field(path, value, message):
    from jaxvlm.models.config import from_hf_dict

    with pytest.raises(models.CheckpointError) as error:
        from_hf_dict(_with(QWEN2_5_VL_3B, path, value))
    assert str(error.value) == "config.json: " + message


def test_nested_config_errors_name_the_nested_path(tiny_checkpoint, tmp_path):
    path = _copy(tiny_checkpoint, tmp_path / "nested")
    file = os.path.join(path, "config.json")
    config = json.loads(open(file).read())
    for field, value, message in [
        ("text_config.num_attention_heads", 0, "text_config.num_attention_heads: must be a positive integer, got 0"),
        (
            "text_config.rope_parameters.mrope_section",
            [2, 3, 2],
            "text_config.rope_parameters.mrope_section: [2, 3, 2] sums to 7, but must sum to half the head dimension "
            "(text_config.hidden_size / text_config.num_attention_heads = 64 / 4 = 16), 8",
        ),
        (
            "text_config.rope_parameters.rope_theta",
            None,
            "text_config.rope_parameters.rope_theta: must be a positive finite number, got null",
        ),
        (
            "vision_config.rope_parameters.rope_theta",
            -1.0,
            "vision_config.rope_parameters.rope_theta: must be a positive finite number, got -1.0",
        ),
        (
            "vision_config.out_hidden_size",
            32,
            "vision_config.out_hidden_size: 32 must equal text_config.hidden_size=64",
        ),
    ]:
        open(file, "w").write(json.dumps(_with(config, field, value)))
        with pytest.raises(models.CheckpointError, match="^" + re.escape(f"{file}: {message}")):
            models.load_pretrained(path)


def test_config_file_errors_name_the_file(tmp_path):
    file = tmp_path / "config.json"
    for content, message in [
        (b'["qwen2_5_vl"]', r'config\.json: must be a JSON object, got \["qwen2_5_vl"\]'),
        (b'{"model_type": "qwen2", "vocab_size": \xff}', r"config\.json: not UTF-8 text \(byte 38: invalid start byte"),
        (b"[" * 100_000, r"config\.json: invalid JSON: nested too deeply"),
    ]:
        file.write_bytes(content)
        with pytest.raises(models.CheckpointError, match=message):
            models.load_hf_config(str(tmp_path))
    file.write_bytes(b"\xef\xbb\xbf" + json.dumps(QWEN2_5_0_5B).encode())  # a byte-order mark is no error
    assert models.load_hf_config(str(file)).text.hidden_size == 896


def test_model_config_rejects_non_positive_sizes_by_name():
    cfg = models.preset("tiny")
    with pytest.raises(ValueError, match=r"^text\.num_key_value_heads=0: must be a positive integer$"):
        cfg.replace(text=dataclasses.replace(cfg.text, num_key_value_heads=0))
    with pytest.raises(ValueError, match=r"^vision\.patch_size=0: must be a positive integer$"):
        cfg.replace(vision=dataclasses.replace(cfg.vision, patch_size=0))
