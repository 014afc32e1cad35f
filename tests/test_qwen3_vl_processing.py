"""Qwen3-VL processing against transformers 5: image processor, rope index, processor, the family default.

transformers' Qwen3-VL uses the Qwen2-VL image processor with the checkpoint's settings (16-px patches, resize
factor 32, mean = std = 0.5); `Qwen2VLImageProcessorPil` (torchvision is not installed) configured from a hub-style
preprocessor_config.json is the oracle of the pixels, a tiny random `Qwen3VLModel` the oracle of `get_rope_index`,
and `Qwen3VLProcessor` (without its video processor) the oracle of our Processor. torch is used here only as the
reference.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image

from jaxvlm import models, runtime
from jaxvlm.configuration import ModelSpec
from jaxvlm.processing import ImageProcessor, Processor, get_rope_index, image_processor_for_model
from jaxvlm.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from jaxvlm.processing.processor import PADDING_SIDES
from jaxvlm.tokenizer import build_tokenizer, special_token_ids
from test_processing import VOCAB_SIZE, left_pad, parity_images, random_rgb, training_corpus

# Qwen3-VL's preprocessor_config.json on the hub (Qwen3-VL-2B/4B-Instruct): the keys it sets.
HUB_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
# The same with small pixel bounds (4..16 merged tokens an image), for short token sequences.
SMALL_PREPROCESSOR_CONFIG = {**HUB_PREPROCESSOR_CONFIG, "size": {"longest_edge": 32 * 32 * 16, "shortest_edge": 4096}}

# A Qwen3-VL-style chat template (the checkpoint's, shortened: no tools, no thinking): unlike Qwen2.5-VL's it adds
# no default system prompt. Images and videos become <|vision_start|><|image_pad|/video_pad|><|vision_end|>.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'text' %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def hf_image_processor(config: dict):
    """transformers' PIL Qwen2-VL image processor from a preprocessor_config.json dict, as from_pretrained reads it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs = {key: value for key, value in config.items() if key not in ("processor_class", "image_processor_type")}
    return Qwen2VLImageProcessorPil(**kwargs)


def assert_bit_identical(ours: dict, expected) -> None:
    """Grids equal and pixel_values float32 with the same bits (not merely close)."""
    np.testing.assert_array_equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert ours["pixel_values"].dtype == np.float32 and expected["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == expected["pixel_values"].shape
    np.testing.assert_array_equal(ours["pixel_values"].view(np.uint32), expected["pixel_values"].view(np.uint32))


def qwen3_parity_images() -> list:
    """The Qwen2.5-VL parity images (odd sizes, RGBA, greyscale, LA, palette with transparency, numpy) plus a tiny
    one far below min_pixels, a wide one, a greyscale one and a numpy RGBA one."""
    rng = np.random.default_rng(7)
    return [
        *parity_images(),
        random_rgb(rng, 9, 8),
        random_rgb(rng, 40, 700),
        Image.fromarray(rng.integers(0, 256, (77, 31), dtype=np.uint8), mode="L"),
        rng.integers(0, 256, (33, 65, 4), dtype=np.uint8),
    ]


# --------------------------------------------------------------------------- image processor


@pytest.mark.parametrize("config", [HUB_PREPROCESSOR_CONFIG, SMALL_PREPROCESSOR_CONFIG], ids=["hub_bounds", "small"])
def test_image_processor_from_qwen3_vl_config_is_bit_identical_to_transformers(config, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours == ImageProcessor.from_dict(config)
    assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size, ours.resize_factor) == (16, 2, 2, 32)
    assert (ours.min_pixels, ours.max_pixels) == (config["size"]["shortest_edge"], config["size"]["longest_edge"])
    assert ours.image_mean == ours.image_std == (0.5, 0.5, 0.5) and ours.patch_dim == 3 * 2 * 16 * 16

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    images = qwen3_parity_images()
    for image in images:  # one by one: a failure names the image
        assert_bit_identical(ours([image]), reference([image], return_tensors="np"))
    batch = ours(images)
    assert_bit_identical(batch, reference(images, return_tensors="np"))
    grids = batch["image_grid_thw"]
    assert (grids[:, 1:] % 2 == 0).all()
    pixels = grids[:, 1] * grids[:, 2] * 16 * 16
    # every image within the bounds: the 9x8 one (and with the hub's 65536 minimum all of them) upscaled
    assert (pixels >= config["size"]["shortest_edge"]).all() and (pixels <= config["size"]["longest_edge"]).all()


def test_qwen3_vl_pixels_differ_from_qwen2_5_vl_settings():
    """Qwen3-VL's settings change the patches (16 px, 0.5 mean/std): the parity above cannot pass by default values."""
    image = random_rgb(np.random.default_rng(1), 64, 96)
    qwen3 = ImageProcessor.from_dict(SMALL_PREPROCESSOR_CONFIG)([image])
    qwen2_5 = ImageProcessor(min_pixels=4096, max_pixels=32 * 32 * 16)([image])
    assert qwen3["pixel_values"].shape[1] == 1536 and qwen2_5["pixel_values"].shape[1] == 1176
    np.testing.assert_array_equal(qwen3["image_grid_thw"], [[1, 4, 6]])  # 64 x 96 is already a multiple of 32
    # mean = std = 0.5 maps [0, 1] onto [-1, 1] exactly
    raw = ImageProcessor.from_dict({**SMALL_PREPROCESSOR_CONFIG, "do_normalize": False})([image])["pixel_values"]
    np.testing.assert_array_equal(qwen3["pixel_values"], (raw - np.float32(0.5)) / np.float32(0.5))


# --------------------------------------------------------------------------- the family default


def spec_with(path: str = "", min_pixels: int = 4096, max_pixels: int = 32 * 32 * 16) -> ModelSpec:
    return ModelSpec(preset="", path=path, tokenizer="", options=(), min_pixels=min_pixels, max_pixels=max_pixels)


def test_image_processor_for_model_per_family(tmp_path):
    qwen3 = models.preset("qwen3_vl_tiny")
    ours = image_processor_for_model(qwen3, min_pixels=4096, max_pixels=32 * 32 * 16)
    assert ours == ImageProcessor.from_dict(SMALL_PREPROCESSOR_CONFIG)
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
        qwen3.vision.patch_size,
        qwen3.vision.temporal_patch_size,
        qwen3.vision.spatial_merge_size,
    )
    images = qwen3_parity_images()[:6]
    assert_bit_identical(ours(images), hf_image_processor(SMALL_PREPROCESSOR_CONFIG)(images, return_tensors="np"))

    qwen2_5 = models.preset("tiny")
    assert qwen2_5.model_type == "qwen2_5_vl"
    # what runtime.build_image_processor built for every preset before Qwen3-VL: CLIP mean / std, the tower's sizes
    assert image_processor_for_model(qwen2_5, min_pixels=3136, max_pixels=6272) == ImageProcessor(
        min_pixels=3136, max_pixels=6272, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    assert ImageProcessor().image_mean == OPENAI_CLIP_MEAN and ImageProcessor().image_std == OPENAI_CLIP_STD

    text_only = types.SimpleNamespace(model_type="qwen3", vision=None)
    assert image_processor_for_model(text_only, min_pixels=1, max_pixels=2) is None
    unknown = types.SimpleNamespace(model_type="llava", vision=qwen3.vision)
    with pytest.raises(ValueError, match="model_type='llava' has a vision config but no default image processor"):
        image_processor_for_model(unknown, min_pixels=1, max_pixels=2)

    # runtime: a preset, and a checkpoint directory without preprocessor_config.json, get the family default
    assert runtime.build_image_processor(spec_with(), qwen3) == ours
    assert runtime.build_image_processor(spec_with(path=str(tmp_path)), qwen3) == ours
    assert runtime.build_image_processor(spec_with(), text_only) is None
    # a checkpoint's preprocessor_config.json wins, with the run's pixel bounds
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG))
    assert runtime.build_image_processor(spec_with(path=str(tmp_path)), qwen2_5) == ours


# --------------------------------------------------------------------------- rope index


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A processor checkpoint directory: the repository's tiny tokenizer with the Qwen3-VL-style chat template and a
    hub-style preprocessor_config.json (small pixel bounds)."""
    from transformers import AutoTokenizer

    out_dir = tmp_path_factory.mktemp("qwen3_vl_processor")
    build_tokenizer(training_corpus(), out_dir, vocab_size=VOCAB_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(SMALL_PREPROCESSOR_CONFIG))
    return out_dir


@pytest.fixture(scope="module")
def token_ids(checkpoint):
    from transformers import AutoTokenizer

    return special_token_ids(AutoTokenizer.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def reference_model(token_ids):
    """A tiny transformers Qwen3VLModel (its get_rope_index is the oracle) with our tokenizer's special ids."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=600,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 1, 1], mrope_interleaved=True, rope_theta=1e4),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=token_ids["image_token_id"],
        video_token_id=token_ids["video_token_id"],
        vision_start_token_id=token_ids["vision_start_token_id"],
        vision_end_token_id=token_ids["vision_end_token_id"],
    )
    return Qwen3VLModel(config).eval()


def qwen3_rope_index(model, input_ids, attention_mask, image_grid_thw, image_token_id):
    """transformers' Qwen3VLModel.get_rope_index on numpy inputs -> (position_ids [3, B, T], deltas [B, 1])."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    grid = None if image_grid_thw is None else torch.as_tensor(np.asarray(image_grid_thw, dtype=np.int64))
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
    with torch.no_grad():
        positions, deltas = model.get_rope_index(
            ids, mm_token_type_ids=(ids == image_token_id).int(), image_grid_thw=grid, attention_mask=mask
        )
    return positions.numpy(), deltas.numpy()


def assert_rope_equals_qwen3(model, input_ids, attention_mask, image_grid_thw, image_token_id):
    expected_positions, expected_deltas = qwen3_rope_index(
        model, input_ids, attention_mask, image_grid_thw, image_token_id
    )
    positions, deltas = get_rope_index(
        input_ids, attention_mask, image_grid_thw, image_token_id=image_token_id, spatial_merge_size=2
    )
    valid = np.ones(np.shape(input_ids), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    np.testing.assert_array_equal(positions[:, valid], expected_positions[:, valid])
    np.testing.assert_array_equal(positions[:, ~valid], 0)
    np.testing.assert_array_equal(deltas, expected_deltas)
    return positions, deltas


def image_rows(token_ids) -> tuple[list[list[int]], np.ndarray]:
    """Rows with 0, 1 and 2 images of different grids (the 2-image row: a 1-token and a 6-token image)."""
    image, start, end = (token_ids[key] for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"))
    grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
    rows = [
        [20, 21, 22, 23, 24],
        [30, start] + [image] * 6 + [end, 31, 32],
        [40, 41, start, image, end, 42, start] + [image] * 6 + [end, 43],
    ]
    return rows, grids


def test_rope_index_equals_qwen3_vl_left_and_right_padded(reference_model, token_ids):
    rows, grids = image_rows(token_ids)
    pad, image = token_ids["pad_token_id"], token_ids["image_token_id"]
    ids, mask = left_pad(rows, pad)
    positions, deltas = assert_rope_equals_qwen3(reference_model, ids, mask, grids, image)
    # 6 tokens of a 4 x 6 grid take max(4, 6) // 2 = 3 positions; the 1-token image takes 1
    assert deltas[:, 0].tolist() == [0, -3, -3]
    right_ids, right_mask = np.full_like(ids, pad), np.zeros_like(mask)
    for row, tokens in enumerate(rows):
        right_ids[row, : len(tokens)], right_mask[row, : len(tokens)] = tokens, 1
    _, right_deltas = assert_rope_equals_qwen3(reference_model, right_ids, right_mask, grids, image)
    np.testing.assert_array_equal(right_deltas, deltas)
    assert_rope_equals_qwen3(reference_model, ids[2:], None, grids[1:], image)  # unpadded, no mask


def test_rope_index_equals_qwen3_vl_two_adjacent_images(reference_model, token_ids):
    image, start, end = (token_ids[key] for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"))
    grids = np.array([[1, 4, 4], [1, 2, 6]])
    ids = np.array([[7, start] + [image] * 4 + [end, start] + [image] * 3 + [end, 8]])
    positions, _ = assert_rope_equals_qwen3(reference_model, ids, np.ones_like(ids), grids, image)
    assert positions[1, 0, 2:6].tolist() == [2, 2, 3, 3]  # image one (2 x 2 tokens) starts at position 2
    assert positions[:, 0, 6].tolist() == [4, 4, 4]  # its vision_end: 2 + max(h, w) // 2
    assert positions[:, 0, 8].tolist() == [6, 6, 6]  # image two's first token, after vision_start at 5


# --------------------------------------------------------------------------- processor


@pytest.fixture(scope="module")
def reference_processor(checkpoint):
    """transformers' Qwen3VLProcessor from the checkpoint's tokenizer and the PIL image processor, without a video
    processor (Qwen3VLVideoProcessor needs torchvision, which the tests do not install)."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(checkpoint),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
    )


def conversations() -> tuple[list, list[list]]:
    """Conversations with 0, 1 and 2 images (one with a system message) and their images."""
    rng = np.random.default_rng(11)
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many shapes are there?"}],
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
    images = [[], [random_rgb(rng, 61, 95)], [random_rgb(rng, 130, 60), random_rgb(rng, 45, 47)]]
    return chats, images


def test_chat_template_comes_from_the_checkpoint(checkpoint):
    processor = Processor.from_pretrained(checkpoint)
    chats, _ = conversations()
    assert processor.apply_chat_template(chats[1]) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # no default system prompt (the repository's own template, Qwen2.5-VL's, adds one)
    assert processor.apply_chat_template(chats[0], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many shapes are there?<|im_end|>\n"
    )


def test_chat_template_from_a_legacy_chat_template_json(checkpoint, tmp_path):
    """A checkpoint whose template is only in the processor-level chat_template.json (older hub layout)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMALL_PREPROCESSOR_CONFIG))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    chats, _ = conversations()
    assert Processor.from_pretrained(tmp_path).apply_chat_template(chats[1]) == Processor.from_pretrained(
        checkpoint
    ).apply_chat_template(chats[1])
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": ["not", "a", "string"]}))
    with pytest.raises(ValueError, match=r"chat_template.json: field 'chat_template' must be a string"):
        Processor.from_pretrained(tmp_path)


@pytest.mark.parametrize("padding_side", PADDING_SIDES)
def test_processor_equals_transformers_qwen3_vl_processor(
    checkpoint, reference_processor, reference_model, token_ids, padding_side
):
    processor = Processor.from_pretrained(checkpoint)
    assert processor.image_processor == ImageProcessor.from_dict(SMALL_PREPROCESSOR_CONFIG)
    chats, images = conversations()
    texts = [processor.apply_chat_template(chat) for chat in chats]
    flat_images = [image for sample in images for image in sample]
    for batch_texts, batch_images, flat in ((texts, images, flat_images), (texts[:1], None, None)):
        expected = reference_processor(
            text=batch_texts, images=flat, padding=True, padding_side=padding_side, return_tensors="np"
        )
        ours = processor(batch_texts, batch_images, padding_side=padding_side)
        assert set(expected) <= set(ours), f"missing keys: {set(expected) - set(ours)}"
        for key in expected:
            np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    batch = processor(texts, images, padding_side=padding_side)
    assert batch["mm_token_type_ids"][1:].max() == 1 and batch["mm_token_type_ids"][0].max() == 0
    assert_bit_identical(batch, reference_processor(text=texts, images=flat_images, return_tensors="np"))
    # the batch's positions are Qwen3VLModel's rope index of the same batch
    expected_positions, expected_deltas = qwen3_rope_index(
        reference_model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], processor.image_token_id
    )
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, valid], expected_positions[:, valid])
    np.testing.assert_array_equal(batch["rope_deltas"], expected_deltas)
    assert processor.image_token_id == token_ids["image_token_id"]


def test_video_placeholder_is_refused_not_tokenized_as_text(checkpoint, reference_processor):
    processor = Processor.from_pretrained(checkpoint)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(chat)
    assert "<|video_pad|>" in text
    with pytest.raises(ValueError, match=r"sample 0: text has 1 '<\|video_pad\|>' video placeholders; videos are not"):
        processor(text)
    rng = np.random.default_rng(3)
    mixed = ["plain text", f"<|vision_start|><|image_pad|><|vision_end|> then <|video_pad|>{text}"]
    with pytest.raises(ValueError, match=r"sample 1: text has 2 '<\|video_pad\|>' video placeholders"):
        processor(mixed, [[], [random_rgb(rng, 40, 40)]])
    with pytest.raises(ValueError, match="no videos were passed"):  # transformers refuses it too
        reference_processor(text=[text], return_tensors="np")
