"""Shared test helpers: tiny random Hugging Face checkpoints built locally (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The test programs are tiny and compiled once or twice each: XLA's backend (LLVM) optimisation costs more CPU than it
# saves. Off for the tests (HLO passes, sharding and numerics are unchanged; child processes inherit it); measured on
# two test files, 45 instead of 80 CPU seconds.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Eight simulated CPU devices, so sharding tests can build meshes; unsharded work stays on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA compilation cache per test session (a fresh directory: nothing leaks between runs). Tests
# compile the same tiny-model programs many times (every trainer run, every resumed run, child processes, which
# inherit the environment); on CPU, compilation is most of their time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvlm-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare float32 numbers at 1e-4: keep matmuls in full precision on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

# The longest test files first (by their measured durations, longest first). CI runs `-n 2 --dist loadfile`: each
# file goes whole to whichever worker is free, in collection order, so a long file collected last (alphabetically,
# test_trainer*.py) would run alone at the end while the other worker idles. Longest-first keeps both busy to the
# end. Files not listed keep their order after these; a stale list costs time, never correctness.
LONGEST_FIRST = (
    "test_recipes.py",
    "test_train_steps.py",
    "test_trainer.py",
    "test_lora.py",
    "test_lora_peft.py",
    "test_bench_memory.py",
    "test_sampling.py",
    "test_bench.py",
    "test_distributed.py",
    "test_model_options.py",
    "test_model_parity.py",
    "test_reproducibility.py",
    "test_trainer_multiprocess.py",
    "test_grpo_variants.py",
    "test_demo.py",
    "test_smollm2_math.py",
    "test_train_checkpoint.py",
    "test_attention.py",
    "test_trl_grpo.py",
    "test_workdir_damage.py",
    "test_dynamic_sampling.py",
    "test_checkpoint.py",
    "test_evaluate.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293
TEXT_VOCAB = 280  # ordinary text ids are drawn below this

# Several shapes of the architecture: GQA ratios, head dims, M-RoPE sections, window sizes, full-attention
# blocks, tied and untied heads.
VL_CONFIGS = {
    "gqa2_tied_win56": dict(
        text=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 1, 1]),
        vision=dict(depth=3, hidden_size=32, num_heads=4, window_size=56, fullatt_block_indexes=[1]),
        tie=True,
    ),
    "gqa6_untied_win112": dict(
        text=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1, mrope_section=[1, 2, 1]),
        vision=dict(depth=4, hidden_size=32, num_heads=2, window_size=112, fullatt_block_indexes=[0, 3]),
        tie=False,
    ),
    "mha_untied_win28_nofull": dict(
        text=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, mrope_section=[4, 2, 2]),
        vision=dict(depth=2, hidden_size=48, num_heads=3, window_size=28, fullatt_block_indexes=[]),
        tie=False,
    ),
}


def randomize_(torch_model, seed: int = 0) -> None:
    """Re-draw weights at a scale where activations are O(1), so a 1e-4 logit tolerance means something."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))  # also the tied head: logits O(10)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def hf_vl_config(name: str, vocab_size: int = 300, token_ids: dict | None = None):
    """transformers config of VL_CONFIGS[name]; token_ids overrides the image / vision-marker ids."""
    from transformers import Qwen2_5_VLConfig

    ids = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    ids.update(token_ids or {})
    spec = VL_CONFIGS[name]
    t, v = spec["text"], spec["vision"]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=t["hidden_size"],
            intermediate_size=2 * t["hidden_size"],
            num_hidden_layers=2,
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"],
            rope_parameters=dict(rope_type="default", mrope_section=t["mrope_section"], rope_theta=10000.0),
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["hidden_size"] + 16,
            num_heads=v["num_heads"],
            out_hidden_size=t["hidden_size"],
            window_size=v["window_size"],
            fullatt_block_indexes=v["fullatt_block_indexes"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
        ),
        **ids,
        tie_word_embeddings=spec["tie"],
    )


def make_hf_vl_checkpoint(path, name: str, seed: int = 0, **config_kwargs):
    """A random tiny Qwen2.5-VL saved with transformers' own save_pretrained; returns the torch model."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_vl_config(name, **config_kwargs)).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


def make_hf_qwen2_checkpoint(path, seed: int = 0, tie: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=dict(rope_type="default", rope_theta=1e5),
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


LLAMA_CONFIGS = {
    # SmolLM2's shape in miniature: tied head, no biases, rope_theta 1e5, GQA 3:1, head_dim given.
    "smollm2_like": dict(
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e5),
    ),
    # Llama 3.2's: untied head, llama3 RoPE scaling (a small original context so all three bands are used), a
    # head_dim that is not hidden / heads, and both bias flags on (no released Llama has them; the config allows it).
    "llama3_scaled_biased": dict(
        hidden_size=40,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=5e5,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    # Linear position interpolation (Llama 2 long-context fine-tunes), multi-head (no GQA).
    "linear_scaled_mha": dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0),
    ),
}


def make_hf_llama_checkpoint(path, name: str = "smollm2_like", seed: int = 0, **overrides):
    """A random tiny `LlamaForCausalLM` of `LLAMA_CONFIGS[name]` saved with transformers' save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=300,
        intermediate_size=80,
        num_hidden_layers=3,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(LlamaConfig(**{**kwargs, **LLAMA_CONFIGS[name], **overrides})).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


def hf_logits(torch_model, batch: dict) -> np.ndarray:
    """transformers' forward on a numpy batch (adds the mm_token_type_ids its processor would)."""
    import torch

    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if v is not None}
    if "pixel_values" in kwargs:
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_TOKEN).int()
    with torch.no_grad():
        return torch_model(**kwargs).logits.float().numpy()


def hf_processor(tokenizer, image_processor, **kwargs):
    """transformers' Qwen2_5_VLProcessor (the oracle of our Processor) without a video processor: that class needs
    torchvision, which the tests do not install; `image_processor` is a `Qwen2VLImageProcessorPil`."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def image_batch(images_per_row, grids, text_len=5, seed=0, pad_to=None, patch_dim=1176):
    """A left-padded batch whose row i holds images_per_row[i] images (grids consumed in order).

    Each image is wrapped as <vision_start> <image_pad>*n <vision_end> between random text tokens.
    Returns dict(input_ids, attention_mask, pixel_values, image_grid_thw) as numpy (pixel_values absent when no image;
    patch_dim: 1176 for Qwen2.5-VL's 14-px patches, 1536 for Qwen3-VL's 16-px ones).
    """
    rng = np.random.default_rng(seed)
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    rows, g = [], 0
    for n_images in images_per_row:
        row = list(rng.integers(0, TEXT_VOCAB, text_len))
        for _ in range(n_images):
            n = int(grids[g].prod()) // 4
            row += [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] + list(rng.integers(0, TEXT_VOCAB, 2))
            g += 1
        rows.append(row)
    assert g == len(grids), "grids left over"
    t = max(map(len, rows)) if pad_to is None else pad_to
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, row in enumerate(rows):
        ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
    batch = dict(input_ids=ids, attention_mask=mask)
    if len(grids):
        batch["pixel_values"] = rng.standard_normal((int(grids.prod(-1).sum()), patch_dim)).astype(np.float32)
        batch["image_grid_thw"] = grids
    return batch


def max_diff_on_valid(a, b, mask) -> float:
    m = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a, np.float32)[m] - np.asarray(b, np.float32)[m]).max())


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{name: (torch_model, path)} for every VL_CONFIGS entry, built once per test session."""
    out = {}
    for name in VL_CONFIGS:
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (make_hf_vl_checkpoint(path, name), path)
    return out


# Data tests: a tokenizer trained on a few sentences and the tiny model configured for it.
CORPUS = [
    "How many circles are there? Is there a red triangle in the image? What colour is the largest shape?",
    "<think>I count the shapes. There are 3 circles.</think>\n<answer>3</answer>",
    "The image shows a large red circle. Answer: 3. yes no A B C D",
] * 30


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A small Qwen-style tokenizer (data and batching tests)."""
    from jaxvlm.tokenizer import build_tokenizer

    return build_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="session")
def model_config(tokenizer):
    """The tiny preset with `tokenizer`'s special-token ids."""
    from jaxvlm.models import config as model_config_lib
    from jaxvlm.tokenizer import configure_model_for_tokenizer

    return configure_model_for_tokenizer(model_config_lib.preset("tiny"), tokenizer)
