"""Parity tests of jaxvlm's torch-free processing against transformers' Qwen2.5-VL.

torch / transformers model classes are used here only as the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import hf_processor
from jaxvlm.processing.image import ImageProcessor, smart_resize
from jaxvlm.processing.processor import PADDING_SIDES, Processor
from jaxvlm.processing.rope import get_rope_index, image_mrope_positions, text_position_ids
from jaxvlm.tokenizer import (
    CHAT_TEMPLATE,
    CONTROL_TOKENS,
    QWEN_SPECIAL_TOKENS,
    REASONING_TAG_TOKENS,
    build_tokenizer,
    special_token_ids,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 512
SMALL_MIN_PIXELS = 28 * 28 * 4
SMALL_MAX_PIXELS = 28 * 28 * 16
IMAGE_ITEM = "<|vision_start|><|image_pad|><|vision_end|>"


# --------------------------------------------------------------------------- helpers / fixtures


def reference_image_processor(**kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def training_corpus() -> list[str]:
    """A small deterministic corpus with chat-formatted and reasoning text."""
    rng = np.random.default_rng(1234)
    words = (
        "the a cat dog red blue green square circle triangle is on left right of image picture "
        "what how many colour shape describe answer think count there are one two three four "
        "above below next to large small bright dark 0 1 2 3 4 5 6 7 8 9 . , ? !"
    ).split()
    corpus = []
    for _ in range(300):
        sentence = " ".join(rng.choice(words, size=int(rng.integers(4, 16))))
        corpus.append(sentence)
        corpus.append(f"<think>{sentence}</think><answer>{rng.integers(0, 100)}</answer>")
    corpus.append("You are a helpful assistant.\nuser\nassistant\nsystem\n")
    return corpus


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(training_corpus(), out_dir, vocab_size=VOCAB_SIZE)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def token_ids(tokenizer):
    return special_token_ids(tokenizer)


@pytest.fixture(scope="session")
def reference_model(token_ids):
    """A tiny transformers Qwen2.5-VL whose special token ids are our tokenizer's."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=600,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1], rope_theta=10000.0),
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=token_ids["eos_token_id"],
            pad_token_id=token_ids["pad_token_id"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=[1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
        ),
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def reference_rope_index(model, input_ids, attention_mask, image_grid_thw, image_token_id):
    """transformers' get_rope_index on numpy inputs -> numpy (position_ids [3,B,T], deltas [B,1])."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    grid = None if image_grid_thw is None else torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64))
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
    with torch.no_grad():
        position_ids, deltas = model.model.get_rope_index(
            ids, mm_token_type_ids=(ids == image_token_id).int(), image_grid_thw=grid, attention_mask=mask
        )
    return position_ids.numpy(), deltas.numpy()


def assert_rope_matches_reference(model, input_ids, attention_mask, image_grid_thw, image_token_id):
    expected_positions, expected_deltas = reference_rope_index(
        model, input_ids, attention_mask, image_grid_thw, image_token_id
    )
    positions, deltas = get_rope_index(
        input_ids, attention_mask, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=2
    )
    assert positions.dtype == np.int32 and positions.shape == (3, *np.shape(input_ids))
    assert deltas.dtype == np.int32 and deltas.shape == (np.shape(input_ids)[0], 1)
    valid = np.ones(np.shape(input_ids), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    np.testing.assert_array_equal(positions[:, valid], expected_positions[:, valid])
    np.testing.assert_array_equal(positions[:, ~valid], 0)
    np.testing.assert_array_equal(deltas, expected_deltas)
    return positions, deltas


def vision_ids(token_ids) -> tuple[int, int, int]:
    """(image, vision_start, vision_end) token ids."""
    return token_ids["image_token_id"], token_ids["vision_start_token_id"], token_ids["vision_end_token_id"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, length - len(row) :] = row
        mask[index, length - len(row) :] = 1
    return ids, mask


def random_rgb(rng, height, width) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def parity_images() -> list:
    """Odd-sized RGB, RGBA, grayscale, palette-with-transparency and numpy inputs."""
    rng = np.random.default_rng(0)
    images = [random_rgb(rng, h, w) for h, w in [(37, 61), (123, 45), (200, 333), (29, 29)]]
    images.append(Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), mode="RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (64, 41), dtype=np.uint8), mode="L"))
    images.append(Image.fromarray(rng.integers(0, 256, (33, 90, 2), dtype=np.uint8), mode="LA"))
    palette = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 7
    images.append(palette)
    images.append(rng.integers(0, 256, (90, 33, 3), dtype=np.uint8))
    images.append(rng.integers(0, 256, (45, 47, 4), dtype=np.uint8))
    return images


# --------------------------------------------------------------------------- image processing


PIXEL_SETTINGS = [
    pytest.param(56 * 56, 28 * 28 * 1280, id="defaults"),
    pytest.param(56 * 56, 28 * 28 * 16, id="max_pixels_downscales"),
    pytest.param(28 * 28 * 300, 28 * 28 * 1280, id="min_pixels_upscales"),
    pytest.param(100, 2000, id="max_below_one_merge_unit"),
]


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_SETTINGS)
def test_image_processor_matches_transformers(min_pixels, max_pixels):
    images = parity_images()
    expected = reference_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)(images, return_tensors="np")
    ours = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)

    assert ours["pixel_values"].dtype == np.float32
    assert ours["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert ours["pixel_values"].shape == expected["pixel_values"].shape
    np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)


def test_image_processor_scaling_settings_really_resize():
    processor_down = ImageProcessor(max_pixels=28 * 28 * 16)
    assert processor_down.resized_size(200, 333) == smart_resize(200, 333, 28, 56 * 56, 28 * 28 * 16)
    assert np.prod(processor_down.resized_size(200, 333)) < 200 * 333
    processor_up = ImageProcessor(min_pixels=28 * 28 * 300)
    assert np.prod(processor_up.resized_size(37, 61)) >= 28 * 28 * 300


def test_image_processor_without_normalize_or_rescale_matches_transformers():
    images = parity_images()[:4]
    for flags in [dict(do_normalize=False), dict(do_rescale=False), dict(do_rescale=False, do_normalize=False)]:
        kwargs = dict(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS, **flags)
        expected = reference_image_processor(**kwargs)(images, return_tensors="np")
        ours = ImageProcessor(**kwargs)(images)
        np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])
        np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)


def test_grayscale_numpy_matches_pil_grayscale():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (57, 39), dtype=np.uint8)
    expected = reference_image_processor()([Image.fromarray(gray, mode="L")], return_tensors="np")
    for variant in (gray, gray[..., None]):
        ours = ImageProcessor()(variant)
        np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])
        np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)


def test_patch_layout_is_merge_units_then_c_t_ph_pw():
    """Each row is one patch with (C, T, ph, pw) order; merge_size**2 consecutive rows form one merge unit."""
    processor = ImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    height, width = 56, 84
    pixels = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3) % 251
    out = processor(pixels.astype(np.uint8))
    patches = out["pixel_values"].reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 4, 6]])
    np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])
    # Row 0..3 are the 2x2 merge unit at the top-left: patches (0,0), (0,1), (1,0), (1,1).
    for row, (patch_y, patch_x) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3)]):
        block = pixels[patch_y * 14 : (patch_y + 1) * 14, patch_x * 14 : (patch_x + 1) * 14].transpose(2, 0, 1)
        np.testing.assert_array_equal(patches[row, :, 0], block)


def test_num_image_tokens_matches_grid():
    processor = ImageProcessor(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)
    reference = reference_image_processor(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)
    rng = np.random.default_rng(5)
    for height, width in [(37, 61), (200, 333), (29, 29), (500, 60)]:
        grid = processor([random_rgb(rng, height, width)])["image_grid_thw"][0]
        assert processor.num_image_tokens(height, width) == int(np.prod(grid)) // 4
        assert processor.num_image_tokens(height, width) == reference.get_number_of_image_patches(height, width) // 4


def test_image_processor_config_round_trip(tmp_path):
    ours = ImageProcessor(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS, image_mean=(0.5, 0.5, 0.5))
    ours.save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json") as f:
        saved = json.load(f)
    assert saved["image_processor_type"] == "Qwen2VLImageProcessor"
    assert saved["size"] == {"shortest_edge": SMALL_MIN_PIXELS, "longest_edge": SMALL_MAX_PIXELS}
    assert ImageProcessor.from_pretrained(tmp_path) == ours

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = parity_images()[:3]
    for reference in (Qwen2VLImageProcessorPil.from_pretrained(tmp_path), Qwen2VLImageProcessorPil(**saved)):
        expected = reference(images, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(ours(images)["pixel_values"], expected)

    written_by_transformers = tmp_path / "from_transformers"
    reference_image_processor(min_pixels=1000, max_pixels=9000, merge_size=2).save_pretrained(written_by_transformers)
    loaded = ImageProcessor.from_pretrained(written_by_transformers)
    assert (loaded.min_pixels, loaded.max_pixels) == (1000, 9000)
    assert loaded == ImageProcessor(min_pixels=1000, max_pixels=9000)


def test_image_processor_from_pretrained_defaults_and_errors(tmp_path):
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 784, "max_pixels": 3136}))
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor(min_pixels=784, max_pixels=3136)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match="resample=2"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageProcessor.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="min_pixels=5000 is larger than max_pixels=1000"):
        ImageProcessor(min_pixels=5000, max_pixels=1000)


def test_image_processor_rejects_bad_inputs():
    processor = ImageProcessor()
    with pytest.raises(TypeError, match="dtype=float32"):
        processor([np.zeros((30, 30, 3), np.float32)])
    with pytest.raises(TypeError, match="builtins.str"):
        processor(["not an image"])
    with pytest.raises(TypeError, match="builtins.str"):
        processor("not an image")
    with pytest.raises(ValueError, match=r"shape \(30, 30, 5\)"):
        processor([np.zeros((30, 30, 5), np.uint8)])
    with pytest.raises(ValueError, match="images is empty"):
        processor([])
    with pytest.raises(ValueError, match="aspect ratio"):
        processor([np.zeros((2, 500, 3), np.uint8)])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ImageProcessor(do_resize=False)([np.zeros((30, 56, 3), np.uint8)])


# --------------------------------------------------------------------------- smart_resize


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
    factor=st.sampled_from([28, 32, 14]),
    min_pixels=st.sampled_from([1, 56 * 56, 28 * 28 * 64, 28 * 28 * 300]),
    max_pixels=st.sampled_from([28 * 28, 28 * 28 * 16, 28 * 28 * 1280, 14 * 14 * 4 * 16384]),
)
def test_smart_resize_matches_transformers(height, width, factor, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    try:
        expected = reference(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return
    assert smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) == expected


def test_smart_resize_examples():
    assert smart_resize(37, 61) == (56, 84)  # upscaled to reach min_pixels
    assert smart_resize(1000, 1000) == (980, 980)  # 1008 x 1008 would exceed max_pixels
    height, width = smart_resize(4000, 3000)
    assert height % 28 == 0 and width % 28 == 0 and height * width <= 28 * 28 * 1280
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        smart_resize(10, 2010)


# --------------------------------------------------------------------------- M-RoPE


def test_rope_left_padded_batch_with_zero_one_two_images(reference_model, token_ids):
    image, start, end = vision_ids(token_ids)
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
    rows = [
        [20, 21, 22, 23, 24],
        [30, start] + [image] * 6 + [end, 31, 32],
        [40, 41, start] + [image] * 1 + [end, 42, start] + [image] * 6 + [end, 43],
    ]
    ids, mask = left_pad(rows, token_ids["pad_token_id"])
    positions, deltas = assert_rope_matches_reference(reference_model, ids, mask, grids, image)
    assert deltas[0, 0] == 0 and deltas[1, 0] < 0


def test_rope_right_padded_and_unpadded(reference_model, token_ids):
    image, start, end = vision_ids(token_ids)
    grids = np.array([[1, 2, 4], [1, 4, 4]])
    rows = [[start] + [image] * 2 + [end, 10], [11, 12, start] + [image] * 4 + [end, 13]]
    ids, left_mask = left_pad(rows, token_ids["pad_token_id"])
    right_ids = np.full_like(ids, token_ids["pad_token_id"])
    right_mask = np.zeros_like(left_mask)
    for row, tokens in enumerate(rows):
        right_ids[row, : len(tokens)] = tokens
        right_mask[row, : len(tokens)] = 1
    assert_rope_matches_reference(reference_model, right_ids, right_mask, grids, image)
    assert_rope_matches_reference(reference_model, ids[1:], None, grids[1:], image)


def test_rope_single_text_only_row(reference_model, token_ids):
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
    positions, deltas = assert_rope_matches_reference(reference_model, ids, np.ones_like(ids), None, 999)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(7), (3, 1, 7)))
    np.testing.assert_array_equal(deltas, [[0]])


def test_rope_adjacent_images_separated_by_vision_tokens(reference_model, token_ids):
    image, start, end = vision_ids(token_ids)
    grids = np.array([[1, 4, 4], [1, 2, 6]])
    ids = np.array([[7, start] + [image] * 4 + [end, start] + [image] * 3 + [end, 8]])
    assert_rope_matches_reference(reference_model, ids, np.ones_like(ids), grids, image)


def test_rope_back_to_back_images_split_by_grid_sizes():
    image = 99
    ids = np.array([[1, 2, image, image, image, 3]])
    positions, deltas = get_rope_index(
        ids, None, np.array([[1, 2, 2], [1, 4, 2]]), image_token_id=image, spatial_merge_size=2
    )
    expected = np.array(
        [
            [0, 1, 2, 3, 3, 5],  # temporal
            [0, 1, 2, 3, 4, 5],  # height
            [0, 1, 2, 3, 3, 5],  # width
        ]
    )
    np.testing.assert_array_equal(positions[:, 0], expected)
    np.testing.assert_array_equal(deltas, [[0]])


def test_image_mrope_positions_layout():
    positions = image_mrope_positions(10, (2, 4, 6), spatial_merge_size=2)
    assert positions.shape == (3, 2 * 2 * 3)
    np.testing.assert_array_equal(positions[0], [10] * 6 + [11] * 6)
    np.testing.assert_array_equal(positions[1], [10, 10, 10, 11, 11, 11] * 2)
    np.testing.assert_array_equal(positions[2], [10, 11, 12] * 4)


def test_rope_errors_name_row_and_counts():
    image = 99
    grids = np.array([[1, 4, 4], [1, 8, 8]])
    ids = np.array([[1, image, image, image, image, 2], [3, image, image, image, image, 4]])
    with pytest.raises(ValueError, match=r"row 1: 4 image tokens but image_grid_thw\[1\] = \[1, 8, 8\] needs 16"):
        get_rope_index(ids, None, grids, image_token_id=image, spatial_merge_size=2)
    with pytest.raises(ValueError, match="row 1: 4 image tokens .* all 1 grids of image_grid_thw are already used"):
        get_rope_index(ids, None, grids[:1], image_token_id=image, spatial_merge_size=2)
    with pytest.raises(ValueError, match="image_grid_thw has 3 grids but the image tokens of the batch use only 2"):
        get_rope_index(ids, None, np.array([[1, 4, 4]] * 3), image_token_id=image, spatial_merge_size=2)
    with pytest.raises(ValueError, match=r"row 0: 4 image tokens but image_grid_thw\[0\]"):
        get_rope_index(ids, None, np.array([[1, 4, 6]]), image_token_id=image, spatial_merge_size=2)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        get_rope_index(ids, None, np.array([[1, 3, 4]]), image_token_id=image, spatial_merge_size=2)


def test_text_position_ids_any_padding_side():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(text_position_ids(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0], [0, 1, 2, 3, 4]])
    assert text_position_ids(mask).dtype == np.int32


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    built = build_tokenizer(training_corpus(), tmp_path / "tok", vocab_size=VOCAB_SIZE)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "<|im_start|>user\n" + IMAGE_ITEM + "How many cats?<|im_end|>\n<think>two</think><answer>2</answer>"
    assert loaded(text, add_special_tokens=False)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]
    assert loaded(text)["input_ids"] == loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) <= VOCAB_SIZE
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_special_tokens_are_single_never_split_ids(tokenizer, token_ids):
    ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(QWEN_SPECIAL_TOKENS) and max(ids) < VOCAB_SIZE
    for token, token_id in zip(QWEN_SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        glued = tokenizer.encode(f"ab{token}cd", add_special_tokens=False)
        assert glued.count(token_id) == 1
    assert token_ids["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_ids["pad_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert token_ids["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert set(token_ids) == {
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "im_start_token_id",
        "eos_token_id",
        "pad_token_id",
    }


def test_skip_special_tokens_keeps_reasoning_tags(tokenizer):
    text = "<|im_start|>assistant\n<think>count</think><answer>3</answer><|im_end|><|endoftext|>"
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert decoded == "assistant\n<think>count</think><answer>3</answer>"
    assert all(token in tokenizer.all_special_tokens for token in CONTROL_TOKENS)
    assert not any(token in tokenizer.all_special_tokens for token in REASONING_TAG_TOKENS)


def test_chat_template_renders_like_qwen2_5_vl(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "image"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_ITEM}What colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        f"<|im_start|>user\nAnd {IMAGE_ITEM}{IMAGE_ITEM}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_build_tokenizer_is_deterministic(tmp_path):
    corpus = training_corpus()
    build_tokenizer(corpus, tmp_path / "a", vocab_size=VOCAB_SIZE)
    build_tokenizer(iter(corpus), tmp_path / "b", vocab_size=VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_build_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(["hello"], tmp_path, vocab_size=100)


# --------------------------------------------------------------------------- processor


@pytest.fixture(scope="session")
def processor(tokenizer):
    return Processor(tokenizer, ImageProcessor(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS))


def three_samples(processor):
    """Chat prompts with 0, 1 and 2 images and their per-sample image lists."""
    rng = np.random.default_rng(11)
    conversations = [
        [{"role": "user", "content": "How many shapes are there?"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "left and right?"},
                ],
            }
        ],
    ]
    texts = [processor.apply_chat_template(conversation) for conversation in conversations]
    images = [[], [random_rgb(rng, 61, 95)], [random_rgb(rng, 130, 60), random_rgb(rng, 45, 47)]]
    return texts, images


def expand_and_tokenize(tokenizer, texts, images, image_processor):
    """Independent reference: expand placeholders via num_image_tokens and tokenize each text."""
    rows = []
    for text, sample_images in zip(texts, images):
        pieces = text.split("<|image_pad|>")
        expanded = pieces[0]
        for image, piece in zip(sample_images, pieces[1:]):
            count = image_processor.num_image_tokens(image.height, image.width)
            expanded += "<|image_pad|>" * count + piece
        rows.append(tokenizer(expanded, add_special_tokens=False)["input_ids"])
    return rows


def test_processor_matches_manual_expansion_and_rope(processor, tokenizer, token_ids, reference_model):
    texts, images = three_samples(processor)
    batch = processor(texts, images)

    rows = expand_and_tokenize(tokenizer, texts, images, processor.image_processor)
    expected_ids, expected_mask = left_pad(rows, token_ids["pad_token_id"])
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], expected_ids)
    np.testing.assert_array_equal(batch["attention_mask"], expected_mask)

    flat_images = [image for sample in images for image in sample]
    vision = processor.image_processor(flat_images)
    np.testing.assert_array_equal(batch["pixel_values"], vision["pixel_values"])
    np.testing.assert_array_equal(batch["image_grid_thw"], vision["image_grid_thw"])
    assert batch["pixel_values"].shape[1] == 1176

    grid_tokens = batch["image_grid_thw"].prod(axis=-1) // 4
    image_counts = (batch["input_ids"] == token_ids["image_token_id"]).sum(axis=1)
    np.testing.assert_array_equal(image_counts, [0, grid_tokens[0], grid_tokens[1] + grid_tokens[2]])

    assert batch["position_ids"].dtype == np.int32 and batch["rope_deltas"].dtype == np.int32
    expected_positions, expected_deltas = reference_rope_index(
        reference_model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["image_grid_thw"],
        token_ids["image_token_id"],
    )
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, valid], expected_positions[:, valid])
    np.testing.assert_array_equal(batch["position_ids"][:, ~valid], 0)
    np.testing.assert_array_equal(batch["rope_deltas"], expected_deltas)


@pytest.mark.parametrize("padding_side", PADDING_SIDES)
def test_processor_matches_transformers_qwen2_5_vl_processor(processor, tokenizer, padding_side):
    reference = hf_processor(
        tokenizer,
        reference_image_processor(min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS),
        chat_template=CHAT_TEMPLATE,
    )
    texts, images = three_samples(processor)
    flat_images = [image for sample in images for image in sample]
    for batch_texts, batch_images, flat in ((texts, images, flat_images), (texts[:1], None, None)):  # text only too
        expected = reference(
            text=batch_texts, images=flat, padding=True, padding_side=padding_side, return_tensors="np"
        )
        ours = processor(batch_texts, batch_images, padding_side=padding_side)
        assert set(expected) <= set(ours), "a key transformers' processor returns is missing"
        for key in expected:
            np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    assert ours["mm_token_type_ids"].dtype == np.int32  # like our input_ids (transformers: int64, same values)
    with_images = processor(texts, images)["mm_token_type_ids"]
    assert with_images.max() == 1 and with_images[0].max() == 0  # the text-only sample has no image tokens


def test_processor_right_padding_and_multiple(processor, token_ids):
    texts, images = three_samples(processor)
    left = processor(texts, images)
    right = processor(texts, images, padding_side="right", pad_to_multiple_of=64)
    assert right["input_ids"].shape[1] % 64 == 0 and right["input_ids"].shape[1] >= left["input_ids"].shape[1]
    for row in range(len(texts)):
        left_tokens = left["input_ids"][row][left["attention_mask"][row] == 1]
        right_tokens = right["input_ids"][row][right["attention_mask"][row] == 1]
        np.testing.assert_array_equal(left_tokens, right_tokens)
        assert right["attention_mask"][row, 0] == 1
        np.testing.assert_array_equal(
            left["position_ids"][:, row][:, left["attention_mask"][row] == 1],
            right["position_ids"][:, row][:, right["attention_mask"][row] == 1],
        )
    assert (right["input_ids"][right["attention_mask"] == 0] == token_ids["pad_token_id"]).all()
    np.testing.assert_array_equal(left["rope_deltas"], right["rope_deltas"])


def test_processor_text_only_batch(processor, reference_model, token_ids):
    batch = processor(["short", "a much longer text with many words in it"])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    text_positions = text_position_ids(batch["attention_mask"])
    np.testing.assert_array_equal(batch["position_ids"], np.broadcast_to(text_positions, (3, *text_positions.shape)))
    np.testing.assert_array_equal(batch["rope_deltas"], np.zeros((2, 1)))
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    expected_positions, _ = reference_rope_index(
        reference_model, batch["input_ids"], batch["attention_mask"], None, token_ids["image_token_id"]
    )
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, valid], expected_positions[:, valid])


def test_processor_single_text_with_image_list(processor):
    rng = np.random.default_rng(2)
    image = random_rgb(rng, 50, 50)
    text = f"{IMAGE_ITEM} and {IMAGE_ITEM}"
    single = processor(text, [image, image])
    nested = processor([text], [[image, image]])
    for key in single:
        np.testing.assert_array_equal(single[key], nested[key])
    assert single["image_grid_thw"].shape == (2, 3)


def test_processor_max_length(processor):
    texts, images = three_samples(processor)
    full = processor(texts, images)
    lengths = full["attention_mask"].sum(axis=1)
    image_tokens = int((full["input_ids"][2] == processor.image_token_id).sum())
    assert lengths[2] > max(lengths[0], lengths[1])
    too_short = int(lengths[2]) - 1
    with pytest.raises(
        ValueError,
        match=rf"sample 2 has {lengths[2]} tokens \(including {image_tokens} image tokens\) "
        rf"but max_length={too_short}",
    ):
        processor(texts, images, max_length=too_short)
    fitted = processor(texts, images, max_length=int(lengths.max()))
    assert fitted["input_ids"].shape[1] == lengths.max()

    truncated = processor(texts[0], max_length=5, on_overflow="truncate")
    assert truncated["input_ids"].shape == (1, 5)
    with_image = processor(texts[1], images[1])["input_ids"][0]
    last_image_token = int(np.flatnonzero(with_image == processor.image_token_id)[-1])
    with pytest.raises(ValueError, match="sample 0 has .* truncating would drop 1 of its"):
        processor(texts[1], images[1], max_length=last_image_token, on_overflow="truncate")
    kept = processor(texts[1], images[1], max_length=last_image_token + 1, on_overflow="truncate")
    assert kept["input_ids"].shape[1] == last_image_token + 1
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        processor(texts[0], on_overflow="drop")


def test_processor_placeholder_errors(processor):
    texts, images = three_samples(processor)
    with pytest.raises(ValueError, match=r"sample 1: text has 1 '<\|image_pad\|>' placeholders but 0 images"):
        processor(texts, [[], [], images[2]])
    with pytest.raises(ValueError, match=r"sample 2: text has 2 '<\|image_pad\|>' placeholders but 1 images"):
        processor(texts, [[], images[1], images[2][:1]])
    with pytest.raises(ValueError, match="got 3 texts but images has 2 entries"):
        processor(texts, images[1:])
    with pytest.raises(ValueError, match="sample 1: text has 1"):
        processor(texts)


def test_processor_save_and_from_pretrained(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.image_processor == processor.image_processor
    assert loaded.image_token_id == processor.image_token_id
    texts, images = three_samples(processor)
    expected = processor(texts, images)
    for key, value in loaded(texts, images).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_processor_batch_decode(processor):
    texts = ["<think>a</think><answer>1</answer>", "two words and then a few more words to be longer"]
    batch = processor(texts)
    assert processor.batch_decode(batch["input_ids"]) == texts
    ragged = [[1, 2], [3]]
    assert processor.batch_decode(ragged) == [processor.tokenizer.decode(row) for row in ragged]
    assert batch["attention_mask"][0, 0] == 0
    assert processor.decode(batch["input_ids"][0], skip_special_tokens=False).startswith("<|endoftext|>")


def test_library_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import jaxvlm.processing.image, jaxvlm.processing.rope, jaxvlm.processing.processor, jaxvlm.tokenizer\n"
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
