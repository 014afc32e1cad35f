"""JSONL reader, prompt styles and the grain pipeline: errors with file:line, skip-and-count, static shapes,
determinism, process sharding, mixtures and checkpointable iterator state."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxvlm.data import pipeline, prompts
from jaxvlm.data.example import ExampleError, validate_example
from jaxvlm.data.jsonl import DataError, JsonlSource
from jaxvlm.processing.image import ImageProcessor
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.tokenizer import configure_model_for_tokenizer

IMAGE_PROCESSOR = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)


def make_example(k: int, *, images: int = 1, size: int = 56, **fields) -> dict:
    rng = np.random.default_rng(k)
    example = {
        "id": f"ex{k}",
        "question": f"How many circles are there in picture {k}?",
        "answer": str(k % 5),
        "answer_type": "number",
        "reasoning": f"I count {k % 5} circles.",
        "caption": f"A picture with {k % 5} circles.",
        "images": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)],
        "source": f"mem:{k}",
    }
    example.update(fields)
    return validate_example(example)


def make_pipeline(sources, tokenizer, model_config, *, weights=None, process_index=0, process_count=1, **cfg):
    cfg.setdefault("batch_size", 4)
    cfg.setdefault("prefetch", 0)
    config = pipeline.PipelineConfig(**cfg)
    encoder = pipeline.ExampleEncoder(tokenizer, IMAGE_PROCESSOR, config)
    collator = pipeline.BatchCollator(
        config,
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=model_config.image_token_id,
        vision_config=model_config.vision,
    )
    return pipeline.build_dataset(
        sources,
        config,
        encoder,
        collator,
        weights=weights,
        process_index=process_index,
        process_count=process_count,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ids_of(batches):
    return [ex["id"] for batch in batches for ex in batch["examples"]]


# ----------------------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------------------


def write_png(path, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def test_jsonl_reads_records_with_images_relative_to_the_file(tmp_path):
    os.makedirs(tmp_path / "imgs")
    write_png(tmp_path / "imgs" / "a.png", 0)
    write_png(tmp_path / "imgs" / "b.png", 1, size=(20, 50))
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "imgs/a.png", "question": "Is it red?", "answer": "Yes", "answer_type": "yesno", "hint": "look"},
            "",
            {
                "images": ["imgs/a.png", "imgs/b.png"],
                "question": "Which?",
                "answer": "c, a",
                "answer_type": "multi_choice",
                "options": ["x", "y", "z"],
                "difficulty": 2,
                "task": "pick",
            },
            {"question": "2+2?", "answer": 4},
        ],
    )
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    assert len(source) == 3
    first, second, third = source[0], source[1], source[2]
    assert first["answer"] == "yes" and first["reasoning"] == "look"
    assert first["source"] == f"{tmp_path / 'd.jsonl'}:1"
    np.testing.assert_array_equal(first["images"][0], np.asarray(Image.open(tmp_path / "imgs" / "a.png")))
    assert second["source"].endswith("d.jsonl:3")  # the blank line 2 is not a record but still counts
    assert second["answer"] == "A,C" and [im.shape for im in second["images"]] == [(30, 40, 3), (50, 20, 3)]
    assert second["difficulty"] == 2 and second["task"] == "pick"
    assert third["images"] == [] and third["answer"] == "4" and third["answer_type"] == "number"


def test_jsonl_r1v_records(tmp_path):
    write_png(tmp_path / "x.png")
    write_jsonl(
        tmp_path / "r1v.jsonl",
        [
            {
                "image": "x.png",
                "problem": "How many?",
                "solution": "<think>hmm</think><answer> 3 </answer>",
                "problem_type": "counting",
            },
            {"image": "x.png", "problem": "Box?", "solution": "<answer>[1, 2, 10, 20]</answer>"},
        ],
    )
    rows = JsonlSource(tmp_path / "r1v.jsonl", record_format="r1v", answer_type="number")
    assert rows[0]["question"] == "How many?" and rows[0]["answer"] == "3" and rows[0]["task"] == "counting"
    boxes = JsonlSource(tmp_path / "r1v.jsonl", record_format="r1v", answer_type="bbox")
    assert boxes[1]["bbox"] == [1.0, 2.0, 10.0, 20.0] and boxes[1]["answer"] == "[1, 2, 10, 20]"


@pytest.mark.parametrize(
    "record, kind, needle",
    [
        ('{"question": "q", "answer": ', "parse", "not valid JSON"),
        ('["a list"]', "parse", "must be a JSON object"),
        ({"answer": "3"}, "field", "field 'question'"),
        ({"question": "q"}, "field", "field 'answer'"),
        ({"question": "q", "answer": "3", "colour": "red"}, "field", "field 'colour'"),
        ({"question": "q", "answer": "maybe", "answer_type": "yesno"}, "field", "field 'answer'"),
        ({"question": "q", "answer": "3", "image": "missing.png"}, "missing_image", "missing.png"),
        ({"question": "q", "answer": "3", "image": "broken.png"}, "bad_image", "broken.png"),
        ({"question": "q", "answer": "3", "difficulty": "hard"}, "field", "field 'difficulty'"),
        ({"question": "q", "answer": "[5, 5, 1, 1]", "answer_type": "bbox"}, "field", "x1 <= x2"),
    ],
)
def test_jsonl_bad_records_name_file_line_and_field(tmp_path, record, kind, needle):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "fine", "answer": "1"}, record])
    source = JsonlSource(tmp_path / "bad.jsonl", answer_type="number")
    assert source[0]["answer"] == "1"
    with pytest.raises(DataError) as info:
        source[1]
    assert str(info.value).startswith(f"{tmp_path / 'bad.jsonl'}:2:")
    assert needle in str(info.value)
    assert info.value.kind == kind


def test_validate_example_errors():
    with pytest.raises(ExampleError, match="field 'images'"):
        validate_example({"question": "q", "answer": "a", "images": [np.zeros((4, 4), np.uint8)]})
    with pytest.raises(ExampleError, match="letter D but only 3 options"):
        validate_example({"question": "q", "answer": "D", "answer_type": "choice", "options": ["a", "b", "c"]})
    assert validate_example({"question": "q", "answer": " b , a ", "answer_type": "multi_choice"})["answer"] == "A,B"


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


def test_prompt_styles_and_targets():
    ex = make_example(3, answer_type="yesno", answer="no")
    r1 = prompts.user_text(ex, "r1")
    assert r1.startswith(ex["question"]) and "<think> </think>" in r1 and r1.endswith("exactly 'yes' or 'no'.")
    assert prompts.user_text(ex, "dyme").endswith("Question:\n\n" + ex["question"])
    assert prompts.user_text(ex, "plain") == ex["question"]
    assert prompts.user_text(ex, "plain", with_caption=True) == f"Caption: {ex['caption']}\n{ex['question']}"
    assert prompts.target_text(ex, "r1") == f"<think>{ex['reasoning']}</think>\n<answer>no</answer>"
    assert prompts.target_text(ex, "dyme") == f"{ex['reasoning']}\nAnswer: no"
    messages = prompts.prompt_messages(ex, "r1")
    assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]
    no_reasoning = {**ex, "reasoning": ""}
    with pytest.raises(ExampleError, match="field 'reasoning'"):
        prompts.target_text(no_reasoning, "dyme")
    with pytest.raises(ExampleError, match="field 'caption'"):
        prompts.user_text({**ex, "caption": ""}, "r1", with_caption=True)


# ----------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------


def test_batches_render_the_chat_template_and_static_shapes(tokenizer, model_config):
    examples = [make_example(k, images=k % 3) for k in range(8)]
    it = iter(
        make_pipeline(
            [examples],
            tokenizer,
            model_config,
            shuffle=False,
            with_targets=True,
            prompt_style="r1",
            max_target_length=48,
        )
    )
    batch = next(it)
    p = batch["prompts"]
    b, t = p["input_ids"].shape
    assert b == 4 and t in (16, 32, 64, 128, 256, 512) and (p["attention_mask"][:, -1] == 1).all()
    assert p["position_ids"].shape == (3, b, t) and p["rope_deltas"].shape == (b, 1)
    # the rows' images one after the other, unpadded (the sampler and the steps lay them out in image slots)
    assert p["pixel_values"].shape[0] == int(p["image_grid_thw"].prod(-1).sum()) and "vision_inputs" not in p
    for row, ex in enumerate(batch["examples"]):
        assert ex["id"] == f"ex{row}" and ex["num_images"] == row % 3 and "images" not in ex
        valid = p["input_ids"][row][p["attention_mask"][row] == 1]
        text = tokenizer.apply_chat_template(
            prompts.prompt_messages(examples[row], "r1"), tokenize=False, add_generation_prompt=True
        )
        per_image = IMAGE_PROCESSOR.num_image_tokens(56, 56)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * per_image)
        assert tokenizer.decode(valid, skip_special_tokens=False) == text
        target = batch["targets"]["completion_ids"][row][batch["targets"]["completion_mask"][row] == 1]
        assert tokenizer.decode(target, skip_special_tokens=False) == prompts.target_text(examples[row], "r1") + (
            "<|im_end|>"
        )
    # pixel rows follow the example order: row 1's single image comes first
    np.testing.assert_array_equal(
        p["pixel_values"][: IMAGE_PROCESSOR(examples[1]["images"])["pixel_values"].shape[0]],
        IMAGE_PROCESSOR(examples[1]["images"])["pixel_values"],
    )


def test_training_positions_equal_get_rope_index_of_the_whole_sequence(tokenizer, model_config):
    examples = [make_example(k, images=k % 3) for k in range(4)]
    batch = next(
        iter(make_pipeline([examples], tokenizer, model_config, shuffle=False, with_targets=True, max_target_length=40))
    )
    sft = pipeline.sft_batch(batch)
    ids = np.concatenate([sft["prompt_ids"], sft["completion_ids"]], 1)
    mask = np.concatenate([sft["prompt_mask"], sft["completion_mask"]], 1)
    expected, _ = get_rope_index(
        ids, mask, batch["prompts"]["image_grid_thw"], image_token_id=model_config.image_token_id, spatial_merge_size=2
    )
    valid = mask.astype(bool)
    np.testing.assert_array_equal(sft["position_ids"][:, valid], np.asarray(expected)[:, valid])


@pytest.mark.slow
def test_pipeline_batches_feed_the_sampler_and_the_training_forward(tokenizer, model_config):
    from jaxvlm import batching, models, sampling, train_steps

    examples = [make_example(k, images=1 + k % 2) for k in range(4)]
    batch = next(
        iter(make_pipeline([examples], tokenizer, model_config, shuffle=False, with_targets=True, max_target_length=32))
    )
    model = models.Qwen25VL(model_config)
    params = models.init_params(model_config, 0)
    inputs = sampling.prepare_prompts(model_config, batch["prompts"])
    assert inputs["input_ids"].shape == batch["prompts"]["input_ids"].shape
    assert inputs["pixel_values"].ndim == 3  # laid out in image slots
    per_row = batching.pixels_per_row(batch["prompts"], [ex["num_images"] for ex in batch["examples"]])
    mb = batching.microbatches(pipeline.sft_batch(batch), (1,), row_pixels=per_row, vision_config=model_config.vision)
    sft = jax.tree.map(lambda x: jnp.asarray(x[0]), mb)
    logp = train_steps.completion_logprobs(model, params, sft)
    assert logp.shape == sft["completion_ids"].shape and bool(jnp.isfinite(logp).all())


def test_raise_mode_stops_at_the_bad_record_with_file_and_line(tmp_path, tokenizer, model_config):
    write_png(tmp_path / "ok.png")
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "ok.png", "question": "q1", "answer": "1"},
            {"image": "gone.png", "question": "q2", "answer": "2"},
        ],
    )
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    it = iter(make_pipeline([source], tokenizer, model_config, shuffle=False, batch_size=2, num_threads=1))
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'images': image file not found"):
        next(it)


def test_skip_mode_drops_and_counts_bad_records_without_substitution(tmp_path, tokenizer, model_config):
    write_png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    records, good = [], []
    for k in range(20):
        record = {"image": "ok.png", "question": f"question {k}", "answer": str(k), "id": f"r{k}"}
        if k % 5 == 1:
            record["image"] = "gone.png"
        elif k % 5 == 2:
            record["image"] = "broken.png"
        elif k == 3:
            record = '{"question": broken json'
        elif k == 8:
            record["question"] = "a very long question " * 60
        else:
            good.append(f"r{k}")
        records.append(record)
    write_jsonl(tmp_path / "d.jsonl", records)
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    shuffled = list(
        make_pipeline(
            [source],
            tokenizer,
            model_config,
            batch_size=3,
            num_epochs=1,
            drop_remainder=False,
            on_error="skip",
            max_prompt_length=220,
            seed=3,
        )
    )
    assert sorted(ids_of(shuffled)) == sorted(good)  # every good record exactly once, nothing substituted
    # In file order the last record is good, so every skip is read before some batch and counted in it.
    in_order = list(
        make_pipeline(
            [source],
            tokenizer,
            model_config,
            batch_size=3,
            num_epochs=1,
            shuffle=False,
            drop_remainder=False,
            on_error="skip",
            max_prompt_length=220,
        )
    )
    assert ids_of(in_order) == good
    totals = None
    for batch in in_order:
        totals = pipeline.add_skip_counts(totals, batch)
    assert totals == {"parse": 1, "field": 0, "missing_image": 4, "bad_image": 4, "too_long": 1}
    assert in_order[0]["skipped"] == {"parse": 1, "field": 0, "missing_image": 1, "bad_image": 1, "too_long": 0}
    assert pipeline.skip_metrics(totals)["data/skipped"] == 10.0


def test_a_pass_with_no_usable_record_stops_with_the_reason_instead_of_spinning(tmp_path, tokenizer, model_config):
    """on_error="skip" with every record bad (here: captions asked of text-only records) and data repeated
    forever: the pipeline raises after two passes, naming the count and the last record's error."""
    write_jsonl(
        tmp_path / "t.jsonl", [{"question": f"what is {k} + 1?", "answer": str(k + 1), "id": f"t{k}"} for k in range(7)]
    )
    source = JsonlSource(tmp_path / "t.jsonl", answer_type="number")
    it = iter(make_pipeline([source], tokenizer, model_config, batch_size=2, on_error="skip", with_caption=True))
    with pytest.raises(DataError, match=r"15 records in a row were skipped \(field: 15\).*'caption'"):
        next(it)
    # One good record in the pass is enough to keep going (and the bad ones are still counted).
    write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"question": "q", "answer": "1", "id": "m0", "caption": "one circle"},
            *[{"question": "q", "answer": "1", "id": f"m{k}"} for k in range(1, 7)],
        ],
    )
    mixed = make_pipeline(
        [JsonlSource(tmp_path / "m.jsonl", answer_type="number")],
        tokenizer,
        model_config,
        batch_size=2,
        on_error="skip",
        with_caption=True,
    )
    batches = [b for _, b in zip(range(3), mixed)]
    assert ids_of(batches) == ["m0"] * 6
    assert sum(b["skipped"]["field"] for b in batches) >= 30


def test_same_seed_same_batches_other_seed_other_order(tokenizer, model_config):
    examples = [make_example(k, images=k % 2) for k in range(12)]
    a = ids_of(take(iter(make_pipeline([examples], tokenizer, model_config, seed=1)), 6))
    b = ids_of(take(iter(make_pipeline([examples], tokenizer, model_config, seed=1)), 6))
    c = ids_of(take(iter(make_pipeline([examples], tokenizer, model_config, seed=2)), 6))
    assert a == b and a != c
    assert sorted(a[:12]) == sorted(ex["id"] for ex in examples)  # epoch 1 is a permutation
    assert a[:12] != a[12:24] and sorted(a[12:24]) == sorted(a[:12])  # reshuffled each epoch


def test_process_shards_partition_each_global_batch(tokenizer, model_config):
    examples = [make_example(k, images=0) for k in range(16)]
    whole = take(iter(make_pipeline([examples], tokenizer, model_config, batch_size=4)), 4)
    parts = [
        take(
            iter(make_pipeline([examples], tokenizer, model_config, batch_size=2, process_index=p, process_count=2)), 4
        )
        for p in range(2)
    ]
    for step in range(4):
        union = ids_of([parts[0][step], parts[1][step]])
        assert sorted(union) == sorted(ids_of([whole[step]]))
        assert not set(ids_of([parts[0][step]])) & set(ids_of([parts[1][step]]))


@pytest.mark.parametrize("prefetch, workers", [(0, 0), (2, 0), (0, 1)])
def test_iterator_state_resumes_exactly(tmp_path, tokenizer, model_config, prefetch, workers):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    examples = [make_example(k, images=k % 2) for k in range(10)]
    bad = validate_example({"question": "q", "answer": "1", "source": "mem:bad", "reasoning": ""})
    sources = [examples + [bad]]
    kwargs = dict(
        prefetch=prefetch,
        worker_processes=workers,
        on_error="skip",
        with_targets=True,
        max_target_length=32,
        batch_size=3,
    )
    it = iter(make_pipeline(sources, tokenizer, model_config, **kwargs))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what TrainCheckpointer stores
    expected = take(it, 4)
    resumed = iter(make_pipeline(sources, tokenizer, model_config, **kwargs))
    resumed.set_state(state)
    got = take(resumed, 4)
    assert ids_of(got) == ids_of(expected)
    assert [b["skipped"] for b in got] == [b["skipped"] for b in expected]
    skipped = [b["skipped"]["field"] for b in take(resumed, 4)] + [b["skipped"]["field"] for b in expected]
    assert sum(skipped) >= 1  # the reasoning-less example is skipped (targets need it)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["prompts"]["input_ids"], b["prompts"]["input_ids"])
        np.testing.assert_array_equal(a["targets"]["completion_ids"], b["targets"]["completion_ids"])


def test_mixture_proportions_and_epochs(tokenizer, model_config):
    text = [make_example(k, images=0, id=f"t{k}") for k in range(10)]
    vision = [make_example(k, images=1, id=f"v{k}") for k in range(30)]
    ds = make_pipeline([vision, text], tokenizer, model_config, weights=[3, 1], batch_size=8)
    seen = ids_of(take(iter(ds), 25))
    share = sum(i.startswith("v") for i in seen) / len(seen)
    assert abs(share - 0.75) < 0.03
    finite = make_pipeline(
        [vision, text], tokenizer, model_config, weights=[3, 1], batch_size=8, num_epochs=1, drop_remainder=False
    )
    rows = ids_of(list(finite))
    assert len(rows) == 40 and sorted(r for r in rows if r.startswith("v")) == sorted(e["id"] for e in vision)


def test_caption_and_dyme_styles_and_text_only_batches(tokenizer, model_config):
    examples = [make_example(k, images=0) for k in range(4)]
    batch = next(
        iter(make_pipeline([examples], tokenizer, model_config, shuffle=False, prompt_style="dyme", with_caption=True))
    )
    assert "pixel_values" not in batch["prompts"]
    row = batch["prompts"]["input_ids"][0][batch["prompts"]["attention_mask"][0] == 1]
    decoded = tokenizer.decode(row, skip_special_tokens=False)
    assert f"Caption: {examples[0]['caption']}" in decoded and 'please use the format "Answer: .."' in decoded
    np.testing.assert_array_equal(
        batch["prompts"]["position_ids"][0][0][batch["prompts"]["attention_mask"][0] == 1], np.arange(len(row))
    )


def test_pipeline_config_errors():
    with pytest.raises(ValueError, match="unknown data config key"):
        pipeline.PipelineConfig.from_dict({"batch_size": 2, "batchsize": 3})
    with pytest.raises(ValueError, match="on_error"):
        pipeline.PipelineConfig(batch_size=2, on_error="ignore")
    with pytest.raises(ValueError, match="prompt_buckets"):
        pipeline.PipelineConfig(batch_size=2, prompt_buckets=(64, 32))
    with pytest.raises(ValueError, match="max_prompt_length"):
        pipeline.PipelineConfig(batch_size=2, prompt_buckets=(64,), max_prompt_length=128)
    assert pipeline.PipelineConfig.from_dict(
        {"batch_size": 2, "prompt_buckets": [32, 64], "max_prompt_length": 64}
    ).prompt_buckets == (32, 64)


def test_bucket_rules():
    assert pipeline._bucket(17, (), "x", floor=16) == 32
    assert pipeline._bucket(3, (), "x", floor=16) == 16
    assert pipeline._bucket(20, (8, 24, 40), "x") == 24
    assert pipeline._bucket(5, (), "x") == 8 and pipeline._bucket(16, (), "x") == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        pipeline._bucket(50, (8, 24, 40), "prompt length")


# ----------------------------------------------------------------------------------------------------------
# The built-in tokenizer and the gym through the whole pipeline
# ----------------------------------------------------------------------------------------------------------


def test_builtin_tokenizer_is_cached_loads_through_autotokenizer_and_fits_the_tiny_model(tmp_path):
    from transformers import AutoTokenizer

    from jaxvlm.data import gym
    from jaxvlm.models import config as model_config_lib
    from jaxvlm.tokenizer import QWEN_SPECIAL_TOKENS, builtin_tokenizer

    tok = builtin_tokenizer(tmp_path / "tok", num_examples=300)
    stamp = os.path.getmtime(tmp_path / "tok" / "tokenizer.json")
    again = builtin_tokenizer(tmp_path / "tok", num_examples=300)  # same settings: loaded, not retrained
    assert os.path.getmtime(tmp_path / "tok" / "tokenizer.json") == stamp
    auto = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for token in QWEN_SPECIAL_TOKENS:
        assert len(auto.encode(token, add_special_tokens=False)) == 1
    examples = [gym.GymSource("validation", 9)[k] for k in range(9)]
    for ex in examples:
        for style in ("r1", "dyme"):
            text = auto.apply_chat_template(
                prompts.prompt_messages(ex, style), tokenize=False, add_generation_prompt=True
            ) + prompts.target_text(ex, style)
            ids = auto.encode(text, add_special_tokens=False)
            assert ids == again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
            assert auto.decode(ids, skip_special_tokens=False) == text
    answer_text = "<think>a b</think>\n<answer>3</answer>"
    assert auto.decode(auto.encode(answer_text), skip_special_tokens=True) == answer_text  # tags stay visible
    tiny = configure_model_for_tokenizer(model_config_lib.preset("tiny"), auto)
    assert tiny.image_token_id == auto.convert_tokens_to_ids("<|image_pad|>")
    assert tiny.text.eos_token_id == auto.eos_token_id and max(auto.get_vocab().values()) < tiny.text.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        configure_model_for_tokenizer(
            model_config_lib.preset(
                "tiny",
                text=model_config_lib.TextConfig(
                    vocab_size=300,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    mrope_section=(2, 3, 3),
                ),
            ),
            auto,
        )
    # a different setting retrains
    other = builtin_tokenizer(tmp_path / "tok", num_examples=200, vocab_size=600)
    assert len(other) <= 600


def test_gym_and_jsonl_sources_from_config_entries(tmp_path, tokenizer, model_config):
    from jaxvlm.data import sources

    write_png(tmp_path / "a.png")
    write_jsonl(
        tmp_path / "d.jsonl",
        [{"image": "a.png", "question": f"q{k}", "answer": str(k), "reasoning": "r"} for k in range(6)],
    )
    data = {
        "sources": [
            {"kind": "gym", "split": "train", "num_examples": 12, "tasks": ["exists", "count"], "weight": 2.0},
            {"kind": "jsonl", "path": str(tmp_path / "d.jsonl"), "answer_type": "number", "weight": 1.0},
        ],
        "batch_size": 6,
        "prompt_style": "r1",
        "prefetch": 0,
        "num_threads": 1,
    }
    it = iter(
        sources.input_pipeline(data, tokenizer, IMAGE_PROCESSOR, model_config, with_targets=True, max_target_length=256)
    )
    rows = [ex for _ in range(4) for ex in next(it)["examples"]]
    from_gym = [ex for ex in rows if ex["source"] == "gym"]
    assert {ex["task"] for ex in from_gym} == {"exists", "count"}
    assert abs(len(from_gym) / len(rows) - 2 / 3) < 0.1
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.taks: not a key of a 'gym' source"):
        sources.input_pipeline(
            {"sources": [{"kind": "gym", "num_examples": 4, "taks": ["count"]}], "batch_size": 2},
            tokenizer,
            IMAGE_PROCESSOR,
            model_config,
        )
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.kind: must be one of"):
        sources.make_source({"kind": "hub", "name": "x"})
    with pytest.raises(ValueError, match="unknown data config key"):
        sources.input_pipeline(
            {"sources": data["sources"][:1], "batchsize": 2}, tokenizer, IMAGE_PROCESSOR, model_config
        )


def test_train_checkpointer_saves_and_restores_the_iterator_state(tmp_path, tokenizer, model_config):
    from jaxvlm.checkpoint import TrainCheckpointer
    from jaxvlm.data.gym import GymSource

    source = GymSource("train", 24)
    kwargs = dict(batch_size=4, prefetch=2, with_targets=True, max_target_length=512, seed=5)
    it = iter(make_pipeline([source], tokenizer, model_config, **kwargs))
    take(it, 2)
    state = {"w": jnp.arange(3.0)}
    with TrainCheckpointer(tmp_path / "ckpt", save_every=1, async_save=False) as ckpt:
        ckpt.save(2, state, data_state={"iterator": it.get_state()})
    expected = take(it, 3)
    with TrainCheckpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        _, data_state, _ = ckpt.restore(jax.eval_shape(lambda: state))
    resumed = iter(make_pipeline([source], tokenizer, model_config, **kwargs))
    resumed.set_state(data_state["iterator"])
    got = take(resumed, 3)
    assert ids_of(got) == ids_of(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["prompts"]["pixel_values"], b["prompts"]["pixel_values"])


def test_gym_exported_as_jsonl_reads_back_identically(tmp_path):
    from jaxvlm.data import export
    from jaxvlm.data.gym import GymConfig, GymSource

    path = export.main(
        [
            "--out",
            str(tmp_path),
            "--split",
            "validation",
            "--num_examples",
            "12",
            "--tasks",
            "exists,grounding,word_arithmetic,colors_present",
        ]
    )
    gym = GymSource("validation", 12, GymConfig(tasks=("exists", "grounding", "word_arithmetic", "colors_present")))
    read = JsonlSource(path)
    assert len(read) == 12
    for k in range(12):
        a, b = gym[k], read[k]
        assert b["source"] == f"{path}:{k + 1}" and b["id"] == a["id"]
        for field in (
            "question",
            "answer",
            "answer_type",
            "task",
            "reasoning",
            "caption",
            "difficulty",
            "bbox",
            "options",
        ):
            assert a[field] == b[field], field
        assert len(a["images"]) == len(b["images"])
        for x, y in zip(a["images"], b["images"]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("style", ["r1", "dyme"])
def test_gym_reference_targets_earn_full_reward_and_wrong_answers_none(style):
    """The contract between gym answers, prompt styles and the reward library, over every task."""
    from jaxvlm import rewards
    from jaxvlm.data.gym import TASKS, GymSource

    source = GymSource("train", 6 * len(TASKS))
    examples = [source[k] for k in range(len(source))]
    if style == "r1":
        specs = rewards.parse_reward_specs(["format_think_answer", "accuracy"])
    else:
        specs = rewards.parse_reward_specs(
            [
                "format_dyme",
                {"name": "accuracy", "kwargs": {"extract": "dyme"}},
                {"name": "think_f1", "kwargs": {"extract": "dyme"}},
            ]
        )
    targets = [prompts.target_text(ex, style) for ex in examples]
    result = rewards.compute_rewards(specs, targets, examples)
    assert not any(result.failures.values())
    bad = [(ex["id"], t) for ex, t, r in zip(examples, targets, result.total) if r != len(specs)]
    assert not bad, bad[:3]
    # The same completions scored against another example of the same task with a different answer get
    # no accuracy (grounding: a different box of IoU <= 0.5).
    shuffled = []
    for k, ex in enumerate(examples):
        other = next(
            o for o in examples[k + 1 :] + examples[:k] if o["task"] == ex["task"] and o["answer"] != ex["answer"]
        )
        shuffled.append(other)
    accuracy = rewards.compute_rewards(specs[1:2], targets, shuffled).per_reward[:, 0]
    overlapping = [
        k
        for k, ex in enumerate(examples)
        if ex["task"] == "grounding" and rewards.iou(ex["bbox"], shuffled[k]["bbox"]) > 0.5
    ]
    assert all(accuracy[k] == 0 for k in range(len(examples)) if k not in overlapping)
