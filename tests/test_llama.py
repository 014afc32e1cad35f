"""The Llama-family decoder (SmolLM2, Llama 2 / 3.x): the Qwen2 decoder module with the checkpoint's biases and RoPE
scaling. Parity with transformers' `LlamaForCausalLM` in float32 (logits to 1e-4, greedy decoding token-identical),
checkpoint round trips both ways, and config.json errors that name the field."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LLAMA_CONFIGS, make_hf_llama_checkpoint, max_diff_on_valid
from jaxvlm import models, sampling
from jaxvlm.models.config import CheckpointError, RopeScaling, from_hf_dict, num_params
from jaxvlm.models.qwen2_5_vl import scaled_inv_freq

ATOL = 1e-4


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """{name: (torch model, checkpoint dir)} for every LLAMA_CONFIGS entry."""
    out = {}
    for i, name in enumerate(LLAMA_CONFIGS):
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (make_hf_llama_checkpoint(path, name, seed=i), path)
    return out


def _left_padded(lengths, seed, t=None):
    """input_ids / attention_mask [B, T] of random left-padded rows, and the positions transformers needs."""
    rng = np.random.default_rng(seed)
    t = t or max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.integers(0, 300, n)
        mask[i, t - n :] = 1
    return ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


def _torch_logits(torch_model, ids, mask, positions):
    import torch

    with torch.no_grad():
        return torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_logits_match_transformers(llamas, name):
    torch_model, path = llamas[name]
    model, params = models.load_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vision is None
    hf = torch_model.config
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert (cfg.text.qkv_bias, cfg.text.o_bias, cfg.text.mlp_bias) == (hf.attention_bias,) * 2 + (hf.mlp_bias,)
    assert num_params(cfg) == sum(p.numel() for p in torch_model.parameters())
    # Positions past the llama3 test config's original context (64), so the scaled bands matter.
    ids, mask, positions = _left_padded([90, 57, 12], seed=3)
    ref = _torch_logits(torch_model, ids, mask, positions)
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_valid(ours, ref, mask) < ATOL
    assert np.abs(ref).max() > 1.0  # not two near-zero tensors


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_rope_frequencies_equal_transformers(llamas, name):
    torch_model, _ = llamas[name]
    cfg = from_hf_dict(torch_model.config.to_dict())
    t = cfg.text
    ours = scaled_inv_freq(t.resolved_head_dim, t.rope_theta, t.rope_scaling)
    # float32 `pow` differs between numpy and torch by up to an ulp (as for Qwen2's plain RoPE); the bands and the
    # interpolation are what this checks.
    np.testing.assert_allclose(ours, torch_model.model.rotary_emb.inv_freq.numpy(), rtol=3e-7, atol=0)


def test_the_scaled_configs_use_every_band():
    """The llama3 test config has frequencies in all three bands (kept, interpolated, divided), so a band bug fails."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    plain = scaled_inv_freq(16, 5e5, None)
    scaled = scaled_inv_freq(16, 5e5, scaling)
    ratio = plain / scaled
    assert np.any(ratio == 1) and np.any(np.isclose(ratio, 8)) and np.any((ratio > 1.01) & (ratio < 7.99))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2_like", "llama3_scaled_biased"])
def test_greedy_generation_is_token_identical_to_transformers(llamas, name):
    import torch

    torch_model, path = llamas[name]
    model, params = models.load_pretrained(path)
    ids, mask, _ = _left_padded([5, 13, 9], seed=7)
    ours = sampling.generate(
        model,
        params,
        dict(input_ids=ids, attention_mask=mask),
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=12, temperature=0),
    )
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)


@pytest.mark.parametrize("name", ["smollm2_like", "llama3_scaled_biased"])
def test_save_pretrained_reloads_in_transformers(llamas, name, tmp_path):
    from transformers import LlamaForCausalLM

    torch_model, path = llamas[name]
    model, params = models.load_pretrained(path)
    models.save_pretrained(model, params, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask, positions = _left_padded([20, 8], seed=5)
    ref = _torch_logits(torch_model, ids, mask, positions)
    assert max_diff_on_valid(_torch_logits(reloaded, ids, mask, positions), ref, mask) < ATOL
    # ... and our own reader gets the same config back.
    assert models.load_hf_config(str(tmp_path)) == model.config


def test_flat_transformers4_config_form():
    """Llama checkpoints from the hub keep `rope_theta` at the root and the scaling under `rope_scaling` (with
    `rope_type` or the older `type`)."""
    d = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
    }  # Llama-3.2-1B's config.json (the fields jaxvlm reads)
    cfg = from_hf_dict(d)
    assert cfg.text.rope_theta == 500000.0 and cfg.text.rope_scaling == RopeScaling(factor=32.0)
    assert not (cfg.text.qkv_bias or cfg.text.o_bias or cfg.text.mlp_bias) and cfg.tie_word_embeddings
    assert 1.2e9 < num_params(cfg) < 1.3e9  # Llama-3.2-1B: 1.24B
    old = {**d, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert from_hf_dict(old).text.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)


_SMOLLM2 = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "tie_word_embeddings": True,
}


def test_smollm2_135m_size():
    assert 134_000_000 < num_params(from_hf_dict(_SMOLLM2)) < 135_000_000  # SmolLM2-135M: 134.5M


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0}},
            r'config\.json: rope_parameters\.rope_type: "yarn" is not supported \(supported: default, mrope, linear, '
            r"llama3\)",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e5, "factor": 8.0, "low_freq_factor": 1.0}},
            r"config\.json: rope_parameters\.high_freq_factor: missing",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 1e5,
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                }
            },
            r"config\.json: rope_parameters\.high_freq_factor: 1\.0 must exceed rope_parameters\.low_freq_factor=4\.0",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e5, "factor": -2}},
            r"config\.json: rope_parameters\.factor: must be a positive finite number, got -2",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5, "mrope_section": [8, 12, 12]}},
            r"config\.json: rope_parameters\.mrope_section: model_type llama has no multimodal RoPE",
        ),
        ({"partial_rotary_factor": 0.5}, r"config\.json: partial_rotary_factor: 0\.5 is not supported"),
        ({"attention_bias": "no"}, r'config\.json: attention_bias: must be true or false, got "no"'),
        ({"mlp_bias": 1}, r"config\.json: mlp_bias: must be true or false, got 1"),
    ],
)
def test_config_errors_name_the_field(change, message):
    with pytest.raises(CheckpointError, match=message):
        from_hf_dict({**_SMOLLM2, **change})


def test_a_qwen2_config_cannot_carry_llama_options():
    text = models.TextConfig(mrope_section=None, qkv_bias=False)
    with pytest.raises(ValueError, match="model_type='qwen2' is the Qwen2 decoder"):
        models.ModelConfig(text=text, vision=None, model_type="qwen2")
    with pytest.raises(ValueError, match="a llama model has both or neither"):
        models.ModelConfig(text=models.TextConfig(mrope_section=None, o_bias=False), vision=None, model_type="llama")
