"""Host assembly of micro-batches: each micro-batch carries exactly its rows' images, and scoring a micro-batch
gives the same log-probs as a batch built from those rows alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import batching, models, train_steps
from jaxvlm.data import pipeline
from jaxvlm.processing.vision import vision_layout
from test_data_pipeline import make_example, make_pipeline


def test_position_ids_and_rows_reshape():
    rows = {
        "completion_ids": np.arange(12 * 3).reshape(12, 3),
        "position_ids": np.arange(3 * 12 * 5).reshape(3, 12, 5),
    }
    out = batching.microbatches(rows, (2, 3))
    assert out["completion_ids"].shape == (2, 3, 2, 3) and out["position_ids"].shape == (2, 3, 3, 2, 5)
    np.testing.assert_array_equal(out["completion_ids"][1, 2, 0], rows["completion_ids"][10])
    np.testing.assert_array_equal(out["position_ids"][1, 2, :, 1], rows["position_ids"][:, 11])
    with pytest.raises(ValueError, match="cannot be cut"):
        batching.microbatches(rows, (5,))


def test_each_microbatch_carries_its_rows_images(tokenizer, model_config):
    examples = [make_example(k, images=(0, 1, 2, 1)[k % 4]) for k in range(8)]
    batch = next(
        iter(
            make_pipeline(
                [examples],
                tokenizer,
                model_config,
                shuffle=False,
                batch_size=8,
                with_targets=True,
                max_target_length=32,
            )
        )
    )
    per_row = batching.pixels_per_row(batch["prompts"], [ex["num_images"] for ex in batch["examples"]])
    assert [len(g) for _, g in per_row] == [ex["num_images"] for ex in batch["examples"]]
    rows = pipeline.sft_batch(batch)
    mb = batching.microbatches(rows, (4,), row_pixels=per_row, vision_config=model_config.vision, slot_multiple=2)
    slots, length = mb["pixel_values"].shape[1:3]
    assert slots % 2 == 0
    for i in range(4):
        chunk = per_row[2 * i : 2 * i + 2]
        pixels = np.concatenate([p for p, _ in chunk])
        layout = vision_layout(
            np.concatenate([g for _, g in chunk if len(g)]), model_config.vision, num_slots=slots, slot_len=length
        )
        np.testing.assert_array_equal(mb["pixel_values"][i], layout.pixels(pixels))
        for key, value in layout.inputs().items():
            np.testing.assert_array_equal(mb["vision_inputs"][key][i], value)
        first = int(chunk[0][1].prod(-1).sum()) // model_config.vision.merge_unit  # merged tokens of row 0's images
        np.testing.assert_array_equal(mb["image_offset"][i], [0, first if len(chunk[1][1]) else 0])
    # micro-batch 0 = rows 0 (no image) and 1 (one image); a text-only chunk gets all-padding slots
    text_only = batching.microbatches(
        {k: v[:, :1] if k == "position_ids" else v[:1] for k, v in rows.items()},
        (1,),
        row_pixels=[per_row[0]],
        vision_config=model_config.vision,
    )
    assert "pixel_values" not in text_only
    mixed = batching.microbatches(
        {k: v[:, :2] if k == "position_ids" else v[:2] for k, v in rows.items()},
        (2,),
        row_pixels=[per_row[0], per_row[1]],
        vision_config=model_config.vision,
    )
    assert mixed["pixel_values"].shape[0] == 2 and not mixed["pixel_values"][0].any()


@pytest.mark.slow
def test_a_prompts_rollout_rows_share_one_encoding(tokenizer, model_config):
    """repeat_rows' G copies of a prompt's images are laid out once per micro-batch and every copy's row points at
    them; the log-probs equal those of a micro-batch holding G separate copies."""
    examples = [make_example(k, images=1 + k % 2) for k in range(2)]
    g = 3
    batch = next(
        iter(
            make_pipeline(
                [examples],
                tokenizer,
                model_config,
                shuffle=False,
                batch_size=2,
                with_targets=True,
                max_target_length=16,
            )
        )
    )
    per_row = batching.pixels_per_row(batch["prompts"], [ex["num_images"] for ex in batch["examples"]])
    rows = {k: np.repeat(v, g, axis=1 if k == "position_ids" else 0) for k, v in pipeline.sft_batch(batch).items()}
    shared = batching.microbatches(
        rows, (1,), row_pixels=batching.repeat_rows(per_row, g), vision_config=model_config.vision
    )
    copies = [(p.copy(), grid.copy()) for p, grid in batching.repeat_rows(per_row, g)]  # distinct arrays: no sharing
    separate = batching.microbatches(rows, (1,), row_pixels=copies, vision_config=model_config.vision)
    patches = sum(len(p) for p, _ in per_row)
    assert int((shared["vision_inputs"]["segment_ids"] > 0).sum()) == patches
    assert int((separate["vision_inputs"]["segment_ids"] > 0).sum()) == g * patches
    second = int(per_row[0][1].prod(-1).sum()) // model_config.vision.merge_unit
    np.testing.assert_array_equal(shared["image_offset"][0], [0] * g + [second] * g)
    model = models.Qwen25VL(model_config)
    params = models.init_params(model_config, 2)
    score = jax.jit(lambda p, b: train_steps.completion_logprobs(model, p, b))
    first = lambda mb: jax.tree.map(lambda x: jnp.asarray(x[0]), mb)  # noqa: E731
    mask = rows["completion_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(score(params, first(shared)))[mask], np.asarray(score(params, first(separate)))[mask], atol=2e-5
    )


def test_microbatch_logprobs_equal_a_batch_of_those_rows_alone(tokenizer, model_config):
    examples = [make_example(k, images=(1, 2, 0, 1)[k % 4]) for k in range(4)]
    model = models.Qwen25VL(model_config)
    params = models.init_params(model_config, 1)
    full = next(
        iter(
            make_pipeline(
                [examples],
                tokenizer,
                model_config,
                shuffle=False,
                batch_size=4,
                with_targets=True,
                max_target_length=32,
                prompt_buckets=(256,),
                max_prompt_length=256,
            )
        )
    )
    per_row = batching.pixels_per_row(full["prompts"], [ex["num_images"] for ex in full["examples"]])
    mb = batching.microbatches(pipeline.sft_batch(full), (2,), row_pixels=per_row, vision_config=model_config.vision)
    score = jax.jit(lambda p, b: train_steps.completion_logprobs(model, p, b))
    for i in range(2):
        alone = next(
            iter(
                make_pipeline(
                    [examples[2 * i : 2 * i + 2]],
                    tokenizer,
                    model_config,
                    shuffle=False,
                    batch_size=2,
                    with_targets=True,
                    max_target_length=32,
                    prompt_buckets=(256,),
                    max_prompt_length=256,
                )
            )
        )
        alone_mb = batching.microbatches(
            pipeline.sft_batch(alone),
            (1,),
            vision_config=model_config.vision,
            row_pixels=batching.pixels_per_row(alone["prompts"], [ex["num_images"] for ex in alone["examples"]]),
        )
        expected = score(params, jax.tree.map(lambda x: jnp.asarray(x[0]), alone_mb))
        got = score(params, jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), mb))
        mask = alone["targets"]["completion_mask"].astype(bool)
        np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(expected)[mask], atol=2e-5)


def test_repeat_rows_is_prompt_major():
    a, b = (np.ones((4, 3)), np.ones((1, 3))), (np.zeros((0, 3)), np.zeros((0, 3)))
    assert batching.repeat_rows([a, b], 3) == [a, a, a, b, b, b]
