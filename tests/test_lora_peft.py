"""PEFT adapter directories against transformers + peft, in float32, logits within 1e-4.

For Qwen2.5-VL, Qwen3-VL (vision-tower adapters included: blocks, merger, DeepStack mergers) and text-only Qwen2 and
Llama: adapters with random B (not zero) written by `lora.save_peft_adapter` load onto the transformers model with
`peft.PeftModel.from_pretrained` (the model loaded from our `save_pretrained` of the base), every tensor of the file
in place, and give our unmerged logits; so do the merged export (`save_pretrained` with adapters, read by plain
transformers) and peft's `merge_and_unload()`. The other way: an adapter peft itself wrote (`get_peft_model` with
`init_lora_weights=False`, so B is random) read by `lora.load_peft_adapter` gives peft's logits. And directories we
cannot honour (another rank or alpha, DoRA, rsLoRA, biases, a missing, extra or mis-shaped tensor) raise LoraError
naming the file and the field or tensor.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import (
    hf_logits,
    image_batch,
    make_hf_llama_checkpoint,
    make_hf_qwen2_checkpoint,
    make_hf_vl_checkpoint,
    max_diff_on_valid,
)
from jaxvlm import models
from jaxvlm.models import lora
from jaxvlm.models.checkpoint import SafetensorsFile, save_safetensors
from jaxvlm.models.config import DEFAULT_LORA_TARGETS, LoraConfig
from test_qwen3_vl_parity import PATCH_DIM as QWEN3_PATCH_DIM
from test_qwen3_vl_parity import hf_qwen3_vl

ATOL = 1e-4
RANK, ALPHA = 4, 12.0  # scale 3: a wrong scale shows


def _qwen3_vl_checkpoint(path):
    hf_qwen3_vl("deepstack02_gqa2_untied").save_pretrained(path)  # two DeepStack mergers: a stack of adapters


# model_type -> (how to write the tiny random checkpoint, transformers class, our targets, peft's target_modules,
# the batch's (images per row, grids), values per patch)
MODELS = {
    "qwen2_5_vl": (
        lambda path: make_hf_vl_checkpoint(path, "gqa2_tied_win56"),
        "Qwen2_5_VLForConditionalGeneration",
        (*DEFAULT_LORA_TARGETS, r"^visual/blocks/", r"^visual/merger/"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "attn.proj"]
        + ["mlp.0", "mlp.2"],  # the merger's two linear layers (the model files' and the modules' name)
        ([0, 1], [[1, 4, 8]]),
        1176,
    ),
    "qwen3_vl": (
        _qwen3_vl_checkpoint,
        "Qwen3VLForConditionalGeneration",
        (*DEFAULT_LORA_TARGETS, r"^visual/blocks/", r"^visual/merger/", r"^visual/deepstack_merger_list/"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "attn.proj"]
        + ["linear_fc1", "linear_fc2"],
        ([0, 1], [[1, 4, 6]]),
        QWEN3_PATCH_DIM,
    ),
    # Text only; Qwen2 with a subset (PEFT's classic q/v), so the written target regex must select exactly those.
    "qwen2": (
        make_hf_qwen2_checkpoint,
        "Qwen2ForCausalLM",
        (r"^language_model/layers/self_attn/(q_proj|v_proj)$",),
        ["q_proj", "v_proj"],
        ([0, 0], []),
        1176,
    ),
    "llama": (
        lambda path: make_hf_llama_checkpoint(path, "llama3_scaled_biased"),
        "LlamaForCausalLM",
        DEFAULT_LORA_TARGETS,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ([0, 0], []),
        1176,
    ),
}


def _random_b(params, seed: int, std: float = 0.2) -> dict:
    """`params` with every lora_b drawn normal(0, std): adapters that change the logits."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for path, value in flat.items():
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(std * rng.standard_normal(value.shape), value.dtype)
    return traverse_util.unflatten_dict(flat)


class Setup:
    """One model type: our base (loaded from transformers' files), the adapted config and params (random B), our
    save_pretrained of the base, a batch."""

    def __init__(self, model_type: str, root):
        write, self.hf_class, targets, self.peft_targets, (rows, grids), patch_dim = MODELS[model_type]
        self.root = root
        write(str(root / "hf"))
        base_model, self.base = models.load_pretrained(str(root / "hf"))
        assert base_model.config.model_type == model_type
        self.cfg = base_model.config.replace(lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=targets))
        self.model = models.build_model(self.cfg)
        adapted = lora.add_adapters(self.base, self.cfg.lora, jax.random.key(1))
        self.params = _random_b(adapted, seed=2)
        self.base_dir = str(root / "base")
        models.save_pretrained(self.model, lora.without_adapters(self.params), self.base_dir)
        self.batch = image_batch(rows, grids, seed=3, patch_dim=patch_dim)
        if not grids:  # text only, no padding: transformers then numbers positions 0..T-1 like we do
            self.batch["attention_mask"][:] = 1
        self.base_logits = self.logits(self.base)

    def torch_model(self, path=None):
        import torch
        import transformers

        cls = getattr(transformers, self.hf_class)
        return cls.from_pretrained(path or self.base_dir, dtype=torch.float32).eval()

    def logits(self, params) -> np.ndarray:
        out = self.model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in self.batch.items()})
        return np.asarray(out)

    def diff(self, ours, ref) -> float:
        assert ours.shape == ref.shape
        return max_diff_on_valid(ours, ref, self.batch["attention_mask"])


# CI: Qwen2.5-VL (its adapters carry the in-memory / on-disk name difference, and the trained run of test_lora.py
# checks its peft parity again); JAXVLM_FULL_TESTS=1 adds Qwen3-VL with vision-tower and DeepStack adapters, and the
# text-only Qwen2 and Llama (their names are their files').
PARITY_TYPES = list(MODELS) if os.environ.get("JAXVLM_FULL_TESTS") else ["qwen2_5_vl"]


@pytest.fixture(scope="module", params=PARITY_TYPES)
def case(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp(request.param))


def _peft_state(peft_model) -> dict[str, np.ndarray]:
    """The adapter tensors peft holds, under the names its save_pretrained writes."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}


def _lora_modules(peft_model) -> set[str]:
    """Names of the modules peft put a LoRA layer on (the base model's names)."""
    from peft.tuners.lora import LoraLayer

    return {name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def _our_modules(case) -> set[str]:
    return {
        name
        for layer in lora.targeted_layers(lora.without_adapters(case.params), case.cfg.lora)
        for name in lora.peft_module_names(layer, case.cfg)
    }


def test_our_adapter_loads_into_peft_and_gives_our_logits(case):
    """save_peft_adapter -> PeftModel.from_pretrained on transformers' model of our base: every tensor of the file
    loaded, exactly the adapted modules wrapped, and transformers + peft's logits equal our unmerged ones. The merged
    export and peft's merge_and_unload() agree too."""
    from peft import PeftModel

    adapter_dir = str(case.root / "ours")
    lora.save_peft_adapter(case.cfg, case.params, adapter_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(case.torch_model(), adapter_dir).eval()
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    result = peft_model.load_adapter(adapter_dir, adapter_name="probe")  # peft's own load result, as a 2nd adapter
    assert result.missing_keys == [] and result.unexpected_keys == []
    peft_model.delete_adapter("probe")

    written = SafetensorsFile(os.path.join(adapter_dir, lora.PEFT_WEIGHTS))
    held = _peft_state(peft_model)
    assert sorted(held) == sorted(written.keys())
    for name in written.keys():
        np.testing.assert_array_equal(held[name], written.get(name), err_msg=name)
    assert _lora_modules(peft_model) == _our_modules(case)
    assert len(held) == 2 * len(_our_modules(case))

    ours = case.logits(case.params)
    assert case.diff(ours, case.base_logits) > 0.1  # the adapters matter
    assert np.abs(ours).max() > 1.0
    assert case.diff(ours, hf_logits(peft_model, case.batch)) < ATOL

    merged_dir = str(case.root / "merged")
    models.save_pretrained(case.model, case.params, merged_dir)
    assert case.diff(ours, hf_logits(case.torch_model(merged_dir), case.batch)) < ATOL
    assert case.diff(ours, hf_logits(peft_model.merge_and_unload(), case.batch)) < ATOL


def test_peft_written_adapter_reads_back(case):
    """get_peft_model (init_lora_weights=False: random B) -> peft's save_pretrained -> load_peft_adapter: the same
    tensors, and our logits equal transformers + peft's."""
    import peft
    import torch

    torch_model = peft.get_peft_model(
        case.torch_model(),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=case.peft_targets, init_lora_weights=False),
    ).eval()
    assert _lora_modules(torch_model) == _our_modules(case)
    # peft's B ~ U(+-1/sqrt(r)) at scale 3 gave logits large enough that float32 rounding alone reached 1.5e-4: halved
    with torch.no_grad():
        for name, value in torch_model.named_parameters():
            if ".lora_B." in name:
                value.mul_(0.5)
    peft_dir = str(case.root / "peft")
    torch_model.save_pretrained(peft_dir)

    loaded = lora.load_peft_adapter(peft_dir, case.cfg, case.base)
    ours = case.logits(loaded)
    assert case.diff(ours, case.base_logits) > 0.1
    assert case.diff(ours, hf_logits(torch_model, case.batch)) < ATOL

    # Through our writer again: the same file contents as peft's.
    again = str(case.root / "again")
    lora.save_peft_adapter(case.cfg, loaded, again)
    theirs = SafetensorsFile(os.path.join(peft_dir, lora.PEFT_WEIGHTS))
    mine = SafetensorsFile(os.path.join(again, lora.PEFT_WEIGHTS))
    assert sorted(mine.keys()) == sorted(theirs.keys())
    for name in theirs.keys():
        np.testing.assert_array_equal(mine.get(name), theirs.get(name), err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Without torch: round trips of the tiny presets, and what the reader refuses

TINY_TARGETS = (*DEFAULT_LORA_TARGETS, r"^visual/blocks/", r"^visual/merger/")


@functools.cache
def _tiny_base(name: str) -> dict:
    return models.init_params(models.preset(name))


def _tiny(name: str, targets=TINY_TARGETS):
    """A tiny preset's config with adapters on `targets`, and its random params with adapters (random B)."""
    cfg = models.preset(name, lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=targets))
    return cfg, _random_b(lora.add_adapters(_tiny_base(name), cfg.lora, jax.random.key(0)), seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(config, params, directory) of the tiny Qwen2.5-VL preset with text and vision adapters."""
    cfg, params = _tiny("tiny")
    path = str(tmp_path_factory.mktemp("tiny_adapter"))
    lora.save_peft_adapter(cfg, params, path)
    return cfg, params, path


def _assert_same_adapters(got, want):
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg="/".join(path))


@pytest.mark.parametrize(
    "name, targets",
    [
        ("tiny", TINY_TARGETS),
        ("tiny", (r"self_attn/(q_proj|v_proj)$", r"^visual/merger/fc1$")),
        ("qwen3_vl_tiny", (*TINY_TARGETS, r"^visual/deepstack_merger_list/")),
    ],
)
def test_save_then_load_gives_the_same_adapters(name, targets, tmp_path):
    cfg, params = _tiny(name, targets)
    lora.save_peft_adapter(cfg, params, str(tmp_path))
    _assert_same_adapters(lora.load_peft_adapter(str(tmp_path), cfg, lora.without_adapters(params)), params)
    config = json.load(open(tmp_path / lora.PEFT_CONFIG))
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, ALPHA, "LORA")
    # target_modules (peft re.fullmatch-es it) selects exactly the adapted layers' modules among all linear layers.
    adapted = set(lora.targeted_layers(params, cfg.lora))
    for layer in lora.linear_layers(params):
        for module in lora.peft_module_names(layer, cfg):
            assert bool(re.fullmatch(config["target_modules"], module)) == (layer in adapted), module
    n_modules = sum(len(lora.peft_module_names(layer, cfg)) for layer in adapted)
    assert len(SafetensorsFile(str(tmp_path / lora.PEFT_WEIGHTS)).keys()) == 2 * n_modules


def test_loads_qwen2_5_vl_adapters_with_the_model_files_names(tiny_dir, tmp_path):
    """Adapters trained with transformers 4 before its 4.52 renaming name Qwen2.5-VL's modules as its model files do
    (base_model.model.model.layers.*, base_model.model.visual.*): read as the in-memory names."""
    cfg, params, path = tiny_dir
    shutil.copy(os.path.join(path, lora.PEFT_CONFIG), tmp_path)
    file = SafetensorsFile(os.path.join(path, lora.PEFT_WEIGHTS))
    old = {}
    for key in file.keys():
        key_old = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
        old[key_old.replace("base_model.model.model.visual.", "base_model.model.visual.")] = file.get(key)
    assert any(k.startswith("base_model.model.visual.blocks.") for k in old)
    assert any(k.startswith("base_model.model.model.layers.") for k in old)
    save_safetensors(old, str(tmp_path / lora.PEFT_WEIGHTS))
    _assert_same_adapters(lora.load_peft_adapter(str(tmp_path), cfg, params), params)


@pytest.mark.parametrize(
    "field, value",
    [
        ("r", 8),
        ("lora_alpha", 16),
        ("use_dora", True),
        ("use_rslora", True),
        ("bias", "all"),
        ("lora_bias", True),
        ("init_lora_weights", "pissa"),
        ("rank_pattern", {"q_proj": 8}),
        ("modules_to_save", ["lm_head"]),
        ("peft_type", "LOHA"),
    ],
)
def test_config_fields_we_cannot_honour_are_errors(tiny_dir, tmp_path, field, value):
    cfg, params, path = tiny_dir
    shutil.copy(os.path.join(path, lora.PEFT_WEIGHTS), tmp_path)
    config = json.load(open(os.path.join(path, lora.PEFT_CONFIG)))
    config[field] = value
    json.dump(config, open(tmp_path / lora.PEFT_CONFIG, "w"))
    file = str(tmp_path / lora.PEFT_CONFIG)
    with pytest.raises(lora.LoraError, match=re.escape(f"{file}: {field}={value!r}")):
        lora.load_peft_adapter(str(tmp_path), cfg, params)


def _with_tensors(src: str, dst, change) -> str:
    """A copy of the adapter directory `src` in `dst` whose tensors `change(dict)` edited in place; the weights file."""
    shutil.copy(os.path.join(src, lora.PEFT_CONFIG), dst)
    file = SafetensorsFile(os.path.join(src, lora.PEFT_WEIGHTS))
    tensors = {key: file.get(key) for key in file.keys()}
    change(tensors)
    save_safetensors(tensors, str(dst / lora.PEFT_WEIGHTS))
    return str(dst / lora.PEFT_WEIGHTS)


Q1_A = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"
QKV0_B = "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight"


def test_a_missing_tensor_is_an_error(tiny_dir, tmp_path):
    cfg, params, path = tiny_dir
    weights = _with_tensors(path, tmp_path, lambda t: t.pop(QKV0_B))
    with pytest.raises(lora.LoraError, match=re.escape(weights) + r"(.|\n)*missing \(1\): " + re.escape(QKV0_B)):
        lora.load_peft_adapter(str(tmp_path), cfg, params)


def test_an_extra_tensor_is_an_error(tiny_dir, tmp_path):
    cfg, params, path = tiny_dir
    key = "base_model.model.model.language_model.embed_tokens.lora_embedding_A"
    weights = _with_tensors(path, tmp_path, lambda t: t.update({key: np.zeros((RANK, 1024), np.float32)}))
    with pytest.raises(lora.LoraError, match=re.escape(weights) + r"(.|\n)*extra \(1\): " + re.escape(key)):
        lora.load_peft_adapter(str(tmp_path), cfg, params)


def test_a_mis_shaped_tensor_is_an_error(tiny_dir, tmp_path):
    cfg, params, path = tiny_dir
    weights = _with_tensors(path, tmp_path, lambda t: t.update({Q1_A: np.ascontiguousarray(t[Q1_A].T)}))
    with pytest.raises(
        lora.LoraError, match=re.escape(f"{weights}: {Q1_A} has shape [64, 4], the model needs [4, 64]")
    ):
        lora.load_peft_adapter(str(tmp_path), cfg, params)


def test_part_of_a_stack_is_an_error(tiny_dir, tmp_path):
    """peft can adapt some layers of a stack (layers_to_transform); jaxvlm adapts all or none."""
    cfg, params, path = tiny_dir
    _with_tensors(path, tmp_path, lambda t: [t.pop(Q1_A), t.pop(Q1_A.replace("lora_A", "lora_B"))])
    message = "the file adapts layers [0] of the stack language_model/layers/self_attn/q_proj only"
    with pytest.raises(lora.LoraError, match=re.escape(message)):
        lora.load_peft_adapter(str(tmp_path), cfg, params)


def test_other_layers_than_selected_name_the_targets_that_select_them(tiny_dir):
    """The file adapts the vision tower too, the config only the decoder: the error lists the vision tensors and
    gives targets that select the file's layers, with which the file loads."""
    cfg, params, path = tiny_dir
    text_only = cfg.replace(lora=LoraConfig(rank=RANK, alpha=ALPHA))
    with pytest.raises(lora.LoraError, match=r"extra \(\d+\): base_model\.model\.model\.visual\.") as error:
        lora.load_peft_adapter(path, text_only, params)
    targets = ast.literal_eval(re.search(r"config\.model\.lora\.targets=(\[.*\])", str(error.value))[1])
    assert "visual/merger/fc1" in targets[0]
    hinted = cfg.replace(lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=targets))
    _assert_same_adapters(lora.load_peft_adapter(path, hinted, params), params)
