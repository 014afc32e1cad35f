"""Qwen3-VL and Qwen3 checkpoint I/O: config.json both ways, tensors both ways, against transformers 5's own files.

The mapping is checked against an independent reading of transformers' names (`_our_leaf`, regular expressions over
the state dict), not against checkpoint.py's tables; every tensor is drawn at random (norms and biases included), so a
swapped pair of same-shaped tensors fails."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from jaxvlm import models
from jaxvlm.models.checkpoint import SafetensorsFile, save_safetensors
from jaxvlm.models.config import (
    PRESETS,
    ModelConfig,
    Qwen3VisionConfig,
    TextConfig,
    from_hf_dict,
    num_params,
    to_hf_dict,
)

# ---------------------------------------------------------------------------------------------------------------
# Tiny random checkpoints, written by transformers


def _tiny_hf_config() -> dict:
    """The qwen3_vl_tiny preset as transformers' own Qwen3VLConfig arguments (written out, not from to_hf_dict)."""
    return dict(
        text_config=dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=1000,
        video_token_id=1001,
        vision_start_token_id=1002,
        vision_end_token_id=1003,
        tie_word_embeddings=True,
    )


# Another shape: an untied head, 4 query heads per KV head, q/k/v/o biases, DeepStack from blocks 1 and 3 of 4,
# 8-px patches and a 4 x 4 position table, interleaved sections (2, 1, 1); transformers' default rope_theta (5e5).
GQA4_UNTIED_HF = dict(
    text_config=dict(
        vocab_size=320,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        attention_bias=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    ),
    vision_config=dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        patch_size=8,
        out_hidden_size=48,
        num_position_embeddings=16,
        deepstack_visual_indexes=[1, 3],
    ),
    image_token_id=300,
    video_token_id=301,
    vision_start_token_id=302,
    vision_end_token_id=303,
    tie_word_embeddings=False,
)
GQA4_UNTIED = ModelConfig(
    text=TextConfig(
        vocab_size=320,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        mrope_section=(2, 1, 1),
        mrope_interleaved=True,
        max_position_embeddings=2048,
        qkv_bias=True,
        o_bias=True,
        qk_norm=True,
    ),
    vision=Qwen3VisionConfig(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        patch_size=8,
        out_hidden_size=48,
        num_position_embeddings=16,
        deepstack_visual_indexes=(1, 3),
    ),
    model_type="qwen3_vl",
    tie_word_embeddings=False,
    image_token_id=300,
    video_token_id=301,
    vision_start_token_id=302,
    vision_end_token_id=303,
)
QWEN3_TEXT_HF = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # not hidden_size // heads: the q/k/v widths differ from the model width
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
QWEN3_TEXT = ModelConfig(
    text=TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=10000.0,  # Qwen3Config's defaults
        max_position_embeddings=32768,
        mrope_section=None,
        qkv_bias=False,
        qk_norm=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    vision=None,
    model_type="qwen3",
    tie_word_embeddings=False,
)
CASES = {
    "tiny_tied": (_tiny_hf_config(), PRESETS["qwen3_vl_tiny"]),
    "gqa4_untied_bias": (GQA4_UNTIED_HF, GQA4_UNTIED),
    "qwen3_text": (QWEN3_TEXT_HF, QWEN3_TEXT),
}


def _hf_model(hf_config: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    if "text_config" in hf_config:
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**json.loads(json.dumps(hf_config))))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**hf_config))
    with torch.no_grad():  # every tensor random, norms and biases too (their init is all ones / zeros)
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def hf_checkpoint(request, tmp_path_factory):
    """(case name, transformers model, its save_pretrained directory, the ModelConfig it must load as)."""
    hf_config, expected = CASES[request.param]
    model = _hf_model(hf_config)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path, expected


# ---------------------------------------------------------------------------------------------------------------
# An independent reading of transformers' names: HF tensor name -> (our parameter path, layer index or None)

_RULES = (  # (pattern, our path prefix): group i is the layer, group rest the module path below the prefix
    (r"model\.(?:language_model\.)?layers\.(?P<i>\d+)\.(?P<rest>.+)", ("language_model", "layers")),
    (r"model\.visual\.blocks\.(?P<i>\d+)\.(?P<rest>.+)", ("visual", "blocks")),
    (r"model\.visual\.deepstack_merger_list\.(?P<i>\d+)\.(?P<rest>.+)", ("visual", "deepstack_merger_list")),
    (r"model\.visual\.patch_embed\.proj\.(?P<rest>.+)", ("visual", "patch_embed")),  # a Conv3d
    (r"model\.visual\.(?P<rest>.+)", ("visual",)),
    (r"model\.(?:language_model\.)?(?P<rest>.+)", ("language_model",)),
    (r"lm_head\.(?P<rest>.+)", ("lm_head",)),
)
STACKED = {("language_model", "layers"), ("visual", "blocks"), ("visual", "deepstack_merger_list")}
_NORMS = {"input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "norm", "norm1", "norm2"}


def _our_leaf(name: str) -> tuple[tuple[str, ...], int | None]:
    """(our parameter path, layer index or None) of transformers' tensor `name`."""
    match, prefix = next((m, prefix) for pattern, prefix in _RULES if (m := re.fullmatch(pattern, name)))
    *modules, kind = match["rest"].split(".")
    path = (*prefix, *modules)
    if kind == "bias":
        leaf = "bias"
    elif path[-1] in _NORMS:
        leaf = "scale"
    elif path[-1] in ("embed_tokens", "pos_embed"):
        leaf = "embedding"
    else:
        leaf = "kernel"
    layer = match.groupdict().get("i")
    return (*path, leaf), None if layer is None else int(layer)


def _as_hf(path: tuple[str, ...], value: np.ndarray, hf_shape) -> np.ndarray:
    """Our layout -> transformers': kernels [in, out] -> [out, in]; the patch embedding's [C*T*p*p, D] -> Conv3d's."""
    if path[-1] == "kernel":
        value = value.T
    return value.reshape(hf_shape)


def _leaf(params: dict, path: tuple[str, ...]):
    for key in path:
        params = params[key]
    return params


def _stored_names(path: str) -> set[str]:
    return set(SafetensorsFile(os.path.join(path, "model.safetensors")).keys())


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def test_transformers_checkpoint_loads_tensor_for_tensor(hf_checkpoint):
    _, torch_model, path, expected = hf_checkpoint
    model, params = models.load_pretrained(path)
    assert model.config == expected
    assert type(model) is (models.Qwen3VL if expected.model_type == "qwen3_vl" else models.Qwen25VL)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    if expected.tie_word_embeddings:
        assert "lm_head.weight" not in _stored_names(path)
        state.pop("lm_head.weight")
    seen = set()
    for hf_name, value in state.items():
        ours_path, layer = _our_leaf(hf_name)
        ours = np.asarray(_leaf(params, ours_path))
        ours = ours[layer] if layer is not None else ours
        np.testing.assert_array_equal(_as_hf(ours_path, ours, value.shape), value, err_msg=hf_name)
        seen.add((ours_path, layer))
    # ... and every parameter of ours is one of them (a stacked one: each of its layers).
    wanted = set()
    for p, leaf in _flat(params):
        stacked = p[:2] in STACKED
        wanted |= {(p, i) for i in range(leaf.shape[0])} if stacked else {(p, None)}
    assert seen == wanted


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def test_our_export_is_transformers_checkpoint(hf_checkpoint, tmp_path):
    """save_pretrained writes transformers' tensor names and config; transformers loads it with no missing, unexpected
    or mis-shaped keys and the very tensors it saved."""
    name, torch_model, path, expected = hf_checkpoint
    model, params = models.load_pretrained(path)
    out = str(tmp_path / "export")
    models.save_pretrained(model, params, out)
    assert _stored_names(out) == _stored_names(path)
    cls = type(torch_model)
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, name
    assert type(reloaded.config) is type(torch_model.config)
    original, again = torch_model.state_dict(), reloaded.state_dict()
    assert set(again) == set(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key
    # The config transformers reads from our config.json is the one it reads from its own.
    ours, theirs = (type(torch_model.config).from_pretrained(p).to_dict() for p in (out, path))
    assert {**ours, "_name_or_path": None} == {**theirs, "_name_or_path": None}
    # ... and back into jaxvlm: the same parameters.
    _, again_params = models.load_pretrained(out)
    for p, leaf in _flat(params):
        np.testing.assert_array_equal(np.asarray(_leaf(again_params, p)), np.asarray(leaf), err_msg="/".join(p))


def _qwen2_5_vl_style(name: str) -> str:
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


@pytest.mark.parametrize("hf_checkpoint", ["tiny_tied", "gqa4_untied_bias"], indirect=True)
def test_qwen2_5_vl_style_names_load_as_transformers_5_names(hf_checkpoint, tmp_path):
    """model.layers.* / visual.* (Qwen2.5-VL's on-disk names) read as Qwen3-VL's model.language_model.* /
    model.visual.*; a tensor under both names is an error."""
    _, _, path, _ = hf_checkpoint
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    legacy = {_qwen2_5_vl_style(k): v for k, v in tensors.items()}
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in legacy)
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_safetensors(legacy, str(out / "model.safetensors"))
    _, params = models.load_pretrained(str(out))
    _, reference = models.load_pretrained(path)
    for p, leaf in _flat(reference):
        np.testing.assert_array_equal(np.asarray(_leaf(params, p)), np.asarray(leaf), err_msg="/".join(p))
    both = {**legacy, "model.language_model.norm.weight": tensors["model.language_model.norm.weight"]}
    save_safetensors(both, str(out / "model.safetensors"))
    with pytest.raises(models.CheckpointError, match=r"holds 'model\.language_model\.norm\.weight' twice"):
        models.load_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------------------
# config.json

# Qwen3-VL-4B-Instruct's config.json as published (transformers 4.57: rope_theta + rope_scaling in text_config, the
# vision config's model_type "qwen3_vl"), and Qwen3-0.6B's (text-only qwen3, transformers 4.51).
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2560,
        "initializer_range": 0.02,
        "intermediate_size": 9728,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2560,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
DELETE = object()


def _with(config: dict, **changes) -> dict:
    """A deep copy of `config` with each field at a dotted path (written with "__" for ".") set (DELETE removes it)."""
    config = json.loads(json.dumps(config))
    for path, value in changes.items():
        *parents, key = path.split("__")
        section = config
        for parent in parents:
            section = section[parent]
        if value is DELETE:
            del section[key]
        else:
            section[key] = value
    return config


def test_published_configs_read_as_transformers_reads_them():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = from_hf_dict(QWEN3_VL_4B)
    preset = PRESETS["qwen3_vl_4b"]
    assert cfg == preset.replace(text=dataclasses.replace(preset.text, bos_token_id=151643, eos_token_id=151645))
    lm = from_hf_dict(QWEN3_0_6B)
    assert lm.text.resolved_head_dim == 128 and lm.text.num_key_value_heads == 8 and lm.text.rope_theta == 1e6
    assert lm.tie_word_embeddings and lm.text.qk_norm and not lm.text.qkv_bias and lm.text.mrope_section is None
    with torch.device("meta"):
        torch_model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B))
    assert num_params(lm) == sum(p.numel() for p in torch_model.parameters()) == 596_049_920


@pytest.mark.parametrize("cfg", [*(n for n in PRESETS if n.startswith("qwen3")), "gqa4_untied", "qwen3_text"])
def test_configs_round_trip_and_transformers_reads_what_we_write(cfg, tmp_path):
    from transformers import AutoConfig

    cfg = {"gqa4_untied": GQA4_UNTIED, "qwen3_text": QWEN3_TEXT}.get(cfg) or PRESETS[cfg]
    written = json.loads(json.dumps(to_hf_dict(cfg)))
    assert from_hf_dict(written) == cfg
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert from_hf_dict(AutoConfig.from_pretrained(str(tmp_path)).to_dict()) == cfg


def test_absent_fields_mean_what_they_mean_to_transformers():
    """Left out, head_dim is 128 (not hidden / heads), the KV heads 32, rope_theta 5e5 (Qwen3-VL) or 1e4 (Qwen3), the
    M-RoPE section [24, 20, 20], interleaved; the head is untied, and the vision tower is Qwen3VLVisionConfig()'s."""
    from transformers import Qwen3Config, Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    sizes = dict(vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=64)
    d = {"model_type": "qwen3_vl", "text_config": sizes, "vision_config": {"out_hidden_size": 64}}
    ours, theirs = from_hf_dict(d), Qwen3VLConfig(**json.loads(json.dumps(d)))
    t, text = ours.text, theirs.text_config
    assert (t.resolved_head_dim, t.num_key_value_heads) == (text.head_dim, text.num_key_value_heads) == (128, 32)
    assert t.rope_theta == text.rope_parameters["rope_theta"] == 500000.0
    assert t.max_position_embeddings == text.max_position_embeddings
    assert list(t.mrope_section) == Qwen3VLTextRotaryEmbedding(text).mrope_section and t.mrope_interleaved
    assert ours.tie_word_embeddings is theirs.tie_word_embeddings is False
    vision = theirs.vision_config
    hf_vision = {f.name: getattr(vision, f.name, None) for f in dataclasses.fields(Qwen3VisionConfig)}
    hf_vision.update(rope_theta=vision.rope_parameters["rope_theta"], layer_norm_eps=1e-6)  # hard-coded in the model
    hf_vision["deepstack_visual_indexes"] = tuple(hf_vision["deepstack_visual_indexes"])
    assert dataclasses.asdict(ours.vision) == hf_vision
    lm, reference = from_hf_dict({"model_type": "qwen3", **sizes}), Qwen3Config(**sizes)
    got = (lm.text.resolved_head_dim, lm.text.num_key_value_heads, lm.text.rope_theta, lm.text.max_position_embeddings)
    theta = reference.rope_parameters["rope_theta"]
    assert got == (reference.head_dim, reference.num_key_value_heads, theta, reference.max_position_embeddings)
    assert got[:3] == (128, 32, 10000.0) and not lm.tie_word_embeddings


@pytest.mark.parametrize("root", [True, False, DELETE])
@pytest.mark.parametrize("text", [True, False, DELETE])
def test_tie_word_embeddings_is_read_as_transformers_reads_it(root, text):
    from transformers import Qwen3VLConfig

    d = _with(QWEN3_VL_4B, tie_word_embeddings=root, text_config__tie_word_embeddings=text)
    assert from_hf_dict(d).tie_word_embeddings is Qwen3VLConfig(**d).tie_word_embeddings


CONFIG_ERRORS = [
    (dict(model_type="qwen3_vl_moe"), 'model_type: "qwen3_vl_moe" is not supported (jaxvlm loads "qwen2_5_vl", '),
    (dict(vision_config=DELETE), "vision_config: must be a JSON object, got nothing"),
    (dict(text_config=DELETE), "text_config: must be a JSON object, got nothing"),
    (
        dict(vision_config__num_position_embeddings=2300),
        "vision_config.num_position_embeddings: 2300 is not a square (the table is a square grid of positions)",
    ),
    (
        dict(vision_config__num_position_embeddings=0),
        "vision_config.num_position_embeddings: must be a positive integer, got 0",
    ),
    (
        dict(vision_config__deepstack_visual_indexes=[5, 11, 24]),
        "vision_config.deepstack_visual_indexes[2]: 24 is out of range for vision_config.depth=24",
    ),
    (
        dict(vision_config__deepstack_visual_indexes=[11, 5]),
        "vision_config.deepstack_visual_indexes[1]: 5 does not follow 11: the indexes must be strictly increasing",
    ),
    (
        dict(vision_config__deepstack_visual_indexes=[5, 5]),
        "vision_config.deepstack_visual_indexes[1]: 5 does not follow 5: the indexes must be strictly increasing",
    ),
    (
        dict(vision_config__deepstack_visual_indexes=[5, -1]),
        "vision_config.deepstack_visual_indexes[1]: must be a non-negative integer, got -1",
    ),
    (
        dict(text_config__num_hidden_layers=2),
        "vision_config.deepstack_visual_indexes: 3 DeepStack features, but text_config.num_hidden_layers=2 decoder "
        "layers to add them to",
    ),
    (
        dict(vision_config__out_hidden_size=2048),
        "vision_config.out_hidden_size: 2048 must equal text_config.hidden_size=2560 (the merger projects into the "
        "text embedding)",
    ),
    (
        dict(vision_config__num_heads=3),
        "vision_config.hidden_size: 1024 / vision_config.num_heads=3 must give a head dimension divisible by 4",
    ),
    (dict(vision_config__patch_size=[16, 16]), "vision_config.patch_size: must be a positive integer, got [16, 16]"),
    (
        dict(vision_config__spatial_merge_size=300),
        "vision_config.spatial_merge_size: 300 gives merge units of 90000 patches (at most 65536)",
    ),
    (
        dict(vision_config__rope_parameters={"rope_type": "2d", "rope_theta": 1e4}),
        'vision_config.rope_parameters.rope_type: "2d" is not supported (supported: axial, default)',
    ),
    (dict(text_config__head_dim=None), "text_config.head_dim: must be a positive integer, got null"),
    (
        dict(text_config__rope_scaling__rope_type="mrope"),
        'text_config.rope_scaling.rope_type: "mrope" is not supported (supported: default)',
    ),
    (
        dict(text_config__rope_scaling__mrope_section=[24, 20, 21]),
        "text_config.rope_scaling.mrope_section: [24, 20, 21] sums to 65, but must sum to half the head dimension "
        "(text_config.head_dim = 128), 64",
    ),
    (
        dict(text_config__head_dim=DELETE, text_config__rope_scaling__mrope_section=[8, 4, 4]),
        "text_config.rope_scaling.mrope_section: [8, 4, 4] sums to 16, but must sum to half the head dimension "
        "(text_config.head_dim = 128, qwen3_vl's default), 64",
    ),
    (
        dict(text_config__num_key_value_heads=DELETE, text_config__num_attention_heads=48),  # absent: 32
        "text_config.num_key_value_heads: 32 does not divide text_config.num_attention_heads=48",
    ),
    (dict(text_config__attention_bias=1), "text_config.attention_bias: must be true or false, got 1"),
    (dict(tie_word_embeddings="yes"), 'tie_word_embeddings: must be true or false, got "yes"'),
    (
        dict(vision_config__hidden_act="relu"),
        "vision_config.hidden_act: must be one of ['silu', 'gelu', 'gelu_pytorch_tanh', 'quick_gelu'], got \"relu\"",
    ),
]
QWEN3_ERRORS = [
    (
        dict(rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}),
        "rope_scaling.mrope_section: model_type qwen3 has no multimodal RoPE (1-D positions only)",
    ),
    (
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        'rope_scaling.rope_type: "yarn" is not supported (supported: default)',
    ),
    (
        dict(use_sliding_window=True),
        "use_sliding_window: true is not supported (jaxvlm attends over the whole sequence)",
    ),
    (dict(head_dim=127), "head_dim: the head dimension (head_dim = 127) must be even for RoPE"),
]


@pytest.mark.parametrize(
    "base, changes, message",
    [(QWEN3_VL_4B, *case) for case in CONFIG_ERRORS] + [(QWEN3_0_6B, *case) for case in QWEN3_ERRORS],
    ids=[  # stable across processes (xdist)
        " ".join(f"{k}=<deleted>" if v is DELETE else f"{k}={v!r}" for k, v in case[0].items())
        for case in CONFIG_ERRORS + QWEN3_ERRORS
    ],
)
def test_config_errors_name_the_field(base, changes, message):
    with pytest.raises(models.CheckpointError) as error:
        from_hf_dict(_with(base, **changes))
    assert str(error.value).startswith("config.json: " + message), str(error.value)


@pytest.mark.parametrize("hf_checkpoint", ["tiny_tied"], indirect=True)
def test_a_malformed_config_json_names_the_file_and_the_field(hf_checkpoint, tmp_path):
    _, _, path, _ = hf_checkpoint
    config = json.loads(open(os.path.join(path, "config.json")).read())
    file = tmp_path / "config.json"
    file.write_text(json.dumps(_with(config, vision_config__num_position_embeddings=60)))
    shutil.copy(os.path.join(path, "model.safetensors"), tmp_path)
    with pytest.raises(
        models.CheckpointError,
        match=f"^{re.escape(str(file))}: vision_config.num_position_embeddings: 60 is not a square",
    ):
        models.load_pretrained(str(tmp_path))
