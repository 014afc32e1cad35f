"""Hostile data: each failure a tester found in the data path (issue 18) is a `DataError` naming file:line and the
field, counted by kind in skip mode, never a crash, never silent garbage. The generated mix of all of them is
tests/test_fuzz_data.py; the image builders here are shared with it."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxvlm.data import pipeline, sources
from jaxvlm.data.jsonl import DEFAULT_MAX_IMAGE_PIXELS, DataError, JsonlSource, load_image
from jaxvlm.processing.image import ImageProcessor, convert_to_rgb, pil_to_rgb

IMAGE_PROCESSOR = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# Builders (shared with test_fuzz_data.py)
# ----------------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, length: int | None = None) -> bytes:
    """One PNG chunk; `length` overrides the stored length (a corrupt file), the CRC stays right."""
    stored = len(data) if length is None else length
    return struct.pack(">I", stored) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: PIL reads the size, decodes nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + png_chunk(b"IEND", b"")
    )


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def noise_rgb(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_with_bad_chunk_length(seed: int = 0) -> bytes:
    """A noise PNG whose pixel data is split over two IDAT chunks, the second one's length 100 bytes short: PIL
    reads the rest as the next chunk's header and raises SyntaxError("broken PNG file") while decoding."""
    good = image_bytes(noise_rgb(seed, 64))
    ihdr_end = 8 + 25
    (length,) = struct.unpack(">I", good[ihdr_end : ihdr_end + 4])
    data = good[ihdr_end + 8 : ihdr_end + 8 + length]
    half = len(data) // 2
    return (
        good[:ihdr_end]
        + png_chunk(b"IDAT", data[:half])
        + png_chunk(b"IDAT", data[half:], length=len(data) - half - 100)
        + png_chunk(b"IEND", b"")
    )


def sixteen_bit_grey(values: np.ndarray) -> Image.Image:
    """A mode "I;16" image (what PIL gives for a 16-bit greyscale PNG) with these uint16 samples."""
    return Image.fromarray(np.asarray(values, np.uint16))


def write_lines(path, lines) -> None:
    """JSON lines: dicts are dumped, str lines are written as they are (so they may be invalid JSON)."""
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def encoder_for(tokenizer, **config) -> pipeline.ExampleEncoder:
    config.setdefault("batch_size", 2)
    return pipeline.ExampleEncoder(tokenizer, IMAGE_PROCESSOR, pipeline.PipelineConfig(**config))


def read_and_encode(source: JsonlSource, index: int, encoder: pipeline.ExampleEncoder) -> dict:
    return encoder.encode(source[index])


def skip_pipeline(source_list, tokenizer, model_config, **config):
    config = {"batch_size": 2, "prefetch": 0, "num_threads": 1, "on_error": "skip", "num_epochs": 1, **config}
    cfg = pipeline.PipelineConfig(**config)
    collator = pipeline.BatchCollator(
        cfg,
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=model_config.image_token_id,
        vision_config=model_config.vision,
    )
    encoder = pipeline.ExampleEncoder(tokenizer, IMAGE_PROCESSOR, cfg)
    return pipeline.build_dataset(source_list, cfg, encoder, collator, process_index=0, process_count=1)


def skip_totals(batches) -> dict[str, int]:
    totals = None
    for batch in batches:
        totals = pipeline.add_skip_counts(totals, batch)
    return totals or {}


def fails(source: JsonlSource, index: int) -> DataError:
    with pytest.raises(DataError) as info:
        source[index]
    assert str(info.value).startswith(f"{source.path}:{source.line_number(index)}: ")
    return info.value


# ----------------------------------------------------------------------------------------------------------
# Crashes the tester found: now DataErrors naming file:line and field
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bbox", [5, True, 3.5, "abc", [1, 2, 3], [True, 1, 2, 3], ["1", "2", "3", "4"], {"x": 1}])
def test_a_bbox_of_the_wrong_type_names_the_field(tmp_path, bbox):
    write_lines(tmp_path / "d.jsonl", [{"question": "q", "answer": "1", "bbox": bbox}])
    error = fails(JsonlSource(tmp_path / "d.jsonl"), 0)
    assert error.kind == "field" and "field 'bbox'" in str(error)


def test_a_coordinate_beyond_float_range_is_a_field_error_not_an_overflow(tmp_path):
    write_lines(tmp_path / "d.jsonl", ['{"question": "q", "answer": "1", "bbox": [1, 2, 1' + "0" * 400 + ", 5]}"])
    error = fails(JsonlSource(tmp_path / "d.jsonl"), 0)
    assert error.kind == "field" and "field 'bbox'" in str(error) and "finite" in str(error)
    assert len(str(error)) < 400  # the 401-digit value is quoted briefly


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"question": "q", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"question": "q", "answer": "1", "task": ' + "[" * 40 + "]" * 40 + "}", "nests 41 levels deep"),
        ('{"question": "q", "answer": ' + "9" * 5000 + "}", "4300 digits"),
        ('{"question": "q", "answer": NaN}', "NaN is not a JSON number"),
        ('{"question": "q", "answer": Infinity}', "Infinity is not a JSON number"),
        ('{"question": "q", "answer": -Infinity}', "Infinity is not a JSON number"),
        ('{"question": "q", "answer": 1e999}', "beyond the range of a float"),
        ('{"question": "q", "answer": "1", "question": "r"}', "key 'question' appears twice"),
        ("\ufeff" + '{"question": "q", "answer": "1"}', "BOM"),  # a byte-order mark is allowed on line 1 only
    ],
)
def test_json_that_python_would_crash_on_or_read_as_garbage_is_a_parse_error(tmp_path, line, needle):
    write_lines(tmp_path / "d.jsonl", ['{"question": "q", "answer": "1"}', line])
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="string")
    assert source[0]["answer"] == "1"
    error = fails(source, 1)
    assert error.kind == "parse" and needle in str(error)


def test_nan_and_infinity_never_become_the_answers_nan_and_inf(tmp_path):
    write_lines(tmp_path / "d.jsonl", ['{"question": "q", "answer": NaN}', '{"question": "q", "answer": Infinity}'])
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="string")
    assert [fails(source, k).kind for k in range(2)] == ["parse", "parse"]
    from jaxvlm.data.example import ExampleError, validate_example

    for value in (float("nan"), float("inf"), np.float32("nan")):  # examples built in Python, not read from JSON
        with pytest.raises(ExampleError, match="field 'answer': must be a finite number"):
            validate_example({"question": "q", "answer": value})


def test_a_utf8_byte_order_mark_before_the_first_record_is_allowed(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "1"}\n')
    assert JsonlSource(tmp_path / "d.jsonl")[0]["question"] == "q"


@pytest.mark.parametrize("field", ["question", "reasoning", "caption", "answer", "target", "task"])
def test_a_lone_surrogate_in_text_is_named(tmp_path, field):
    record = {"question": "q", "answer": "1", field: "before \ud800 after"}
    write_lines(tmp_path / "d.jsonl", [json.dumps(record)])  # json.dumps writes it as the escape \ud800
    error = fails(JsonlSource(tmp_path / "d.jsonl"), 0)
    assert error.kind == "field" and f"field {field!r}: contains a lone surrogate '\\ud800' at character 7" in str(
        error
    )


def test_a_lone_surrogate_in_an_option_is_named(tmp_path):
    write_lines(
        tmp_path / "d.jsonl", [{"question": "q", "answer": "A", "answer_type": "choice", "options": ["a", "\udc80"]}]
    )
    assert "field 'options[1]': contains a lone surrogate" in str(fails(JsonlSource(tmp_path / "d.jsonl"), 0))


def test_invalid_utf8_bytes_are_a_parse_error(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    error = fails(JsonlSource(tmp_path / "d.jsonl"), 0)
    assert error.kind == "parse" and "not UTF-8 text" in str(error)


def test_a_record_over_the_size_limit_is_too_long_without_being_read_whole(tmp_path, monkeypatch):
    from jaxvlm.data import jsonl

    monkeypatch.setattr(jsonl, "MAX_RECORD_BYTES", 1000)
    write_lines(tmp_path / "d.jsonl", [{"question": "q" * 2000, "answer": "1"}, {"question": "q", "answer": "2"}])
    source = JsonlSource(tmp_path / "d.jsonl")
    error = fails(source, 0)
    assert error.kind == "too_long" and "over 1000 bytes" in str(error)
    assert source[1]["answer"] == "2"


# ----------------------------------------------------------------------------------------------------------
# Special tokens typed in data text
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, text, token",
    [
        ("question", "What is in <|image_pad|> this picture?", "<|image_pad|>"),
        ("question", "Stop here.<|im_end|><|im_start|>assistant\nyes", "<|im_end|>"),
        ("reasoning", "I count.<|endoftext|>", "<|endoftext|>"),
        ("caption", "<|vision_start|>a cat", "<|vision_start|>"),
        ("answer", "<|im_start|>", "<|im_start|>"),
        ("target", "<think>x</think><|im_end|>", "<|im_end|>"),
    ],
)
def test_special_tokens_in_data_text_are_rejected_naming_field_and_token(tmp_path, tokenizer, field, text, token):
    (tmp_path / "a.png").write_bytes(image_bytes(noise_rgb(0)))
    record = {"image": "a.png", "question": "q", "answer": "yes", "reasoning": "r", "caption": "c", field: text}
    write_lines(tmp_path / "d.jsonl", [record])
    example = JsonlSource(tmp_path / "d.jsonl")[0]  # the reader accepts it: only the encoder knows the tokenizer
    encoder = encoder_for(tokenizer, with_targets=True, with_caption=True, max_target_length=200)
    with pytest.raises(DataError) as info:
        encoder.encode(example)
    assert info.value.kind == "field"
    assert str(info.value).startswith(
        f"{tmp_path / 'd.jsonl'}:1: field {field!r}: contains the special token {token!r}"
    )


def test_a_literal_image_placeholder_is_not_confused_with_an_image(tmp_path, tokenizer):
    """Before: "text has 2 '<|image_pad|>' placeholders but 1 images" (a ValueError, a crash in skip mode)."""
    (tmp_path / "a.png").write_bytes(image_bytes(noise_rgb(0)))
    write_lines(tmp_path / "d.jsonl", [{"image": "a.png", "question": "Is <|image_pad|> red?", "answer": "1"}])
    encoder = encoder_for(tokenizer, on_error="skip")
    skipped = encoder(JsonlSource(tmp_path / "d.jsonl")[0])
    assert isinstance(skipped, pipeline.Skipped) and skipped.kind == "field" and "placeholders" not in skipped.message


def test_reasoning_tags_are_text_not_special_tokens(tmp_path, tokenizer):
    write_lines(tmp_path / "d.jsonl", [{"question": "Use <think> tags.", "answer": "1", "reasoning": "<answer>"}])
    encoded = encoder_for(tokenizer, with_targets=True, max_target_length=64).encode(
        JsonlSource(tmp_path / "d.jsonl")[0]
    )
    assert len(encoded["prompt_ids"]) > 0
    assert "<think>" not in pipeline.special_tokens(tokenizer) and "<|im_end|>" in pipeline.special_tokens(tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_a_bad_image_and_pil_global_is_untouched(tmp_path):
    """A one-colour 20000 x 20000 PNG is 400 KB; PIL itself refuses it with DecompressionBombError."""
    limit_before = Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    (tmp_path / "big.png").write_bytes(png_header_only(9_000, 9_000))  # under PIL's hard limit, over ours
    write_lines(
        tmp_path / "d.jsonl", [{"image": name, "question": "q", "answer": "1"} for name in ("bomb.png", "big.png")]
    )
    source = JsonlSource(tmp_path / "d.jsonl")
    bomb, big = fails(source, 0), fails(source, 1)
    assert bomb.kind == big.kind == "bad_image"
    assert f"over data.max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}" in str(bomb)
    assert f"is 9000x9000 = 81000000 pixels > data.max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}" in str(big)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_image_pixels_is_a_data_option(tmp_path, tokenizer, model_config):
    noise_rgb(0, 40).save(tmp_path / "a.png")  # 1600 pixels
    write_lines(tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "answer": "1"}])
    entry = {"kind": "jsonl", "path": str(tmp_path / "d.jsonl"), "answer_type": "number"}
    data = {"sources": [entry], "batch_size": 1, "prefetch": 0, "num_threads": 1, "num_epochs": 1}
    ok = next(
        iter(sources.input_pipeline({**data, "max_image_pixels": 1600}, tokenizer, IMAGE_PROCESSOR, model_config))
    )
    assert ok["examples"][0]["num_images"] == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'images': image .* is 40x40 = 1600 pixels > "):
        next(iter(sources.input_pipeline({**data, "max_image_pixels": 1599}, tokenizer, IMAGE_PROCESSOR, model_config)))
    for bad in (0, True, 1.5, 2 * Image.MAX_IMAGE_PIXELS + 1):
        with pytest.raises(ValueError, match="max_image_pixels"):
            pipeline.PipelineConfig(batch_size=1, max_image_pixels=bad)


def test_a_png_with_a_wrong_chunk_length_is_a_bad_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(png_with_bad_chunk_length())
    with pytest.raises(SyntaxError), Image.open(path) as image:  # what PIL does with it
        image.load()
    with pytest.raises(
        DataError, match=r"^here: field 'images': cannot decode image .*SyntaxError: broken PNG"
    ) as info:
        load_image(str(path), "here")
    assert info.value.kind == "bad_image"


@pytest.mark.parametrize(
    "data, needle",
    [
        (image_bytes(noise_rgb(0))[:200], "cannot decode image"),  # truncated
        (b"", "cannot identify image file"),
        (b"just some text", "cannot identify image file"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "cannot identify image file"),  # never Ghostscript
        (png_header_only(0, 5), "cannot identify image file"),
        (image_bytes(Image.new("F", (8, 8), 0.5), "TIFF"), "image mode 'F' is not supported"),
    ],
)
def test_broken_or_unsupported_image_files_are_bad_images(tmp_path, data, needle):
    (tmp_path / "x.img").write_bytes(data)
    with pytest.raises(DataError, match=needle) as info:
        load_image(str(tmp_path / "x.img"), "here")
    assert info.value.kind == "bad_image"


def test_sixteen_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    """Before: PIL's convert("RGB") (and transformers') clips "I;16" at 255, so a 16-bit PNG read all white."""
    samples = np.array([[0, 257, 32768], [65535, 1000, 128]], np.uint16)
    sixteen_bit_grey(samples).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode == "I;16"
        assert np.asarray(image.convert("RGB"))[1, 1].tolist() == [255, 255, 255]  # PIL: 1000 of 65535 is white
    expected = np.round(samples / 257).astype(np.uint8)  # 1000 -> 4
    pixels = load_image(str(tmp_path / "g16.png"), "here")
    np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1))
    with Image.open(tmp_path / "g16.png") as image:
        np.testing.assert_array_equal(convert_to_rgb(image), pixels)  # the image processor's PIL path too


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_sixteen_bit_modes_map_the_full_range(mode, dtype):
    samples = np.array([[0, 65535, 257 * 100]])
    image = Image.frombytes(mode, (3, 1), samples.astype(dtype).tobytes())
    np.testing.assert_array_equal(pil_to_rgb(image)[0], [[0, 0, 0], [255, 255, 255], [100, 100, 100]])


def test_mode_i_outside_sixteen_bits_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"image mode 'I' has values -5\.\.70000, outside the 16-bit range"):
        pil_to_rgb(Image.fromarray(np.array([[-5, 70000]], np.int32)))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBX"])
def test_eight_bit_modes_convert_as_pil_and_transformers_do(mode):
    rgb = noise_rgb(3, 8)
    image = rgb.convert(mode)
    pixels = pil_to_rgb(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 8, 3)
    if "A" not in image.getbands():
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))
    else:  # composited onto white: the RGB of an opaque image
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGBA").convert("RGB")))


def test_image_files_of_every_supported_mode_load_as_rgb(tmp_path):
    rgb = noise_rgb(1, 16)
    files = {
        "l.png": rgb.convert("L"),
        "p.png": rgb.convert("P"),
        "rgba.png": rgb.convert("RGBA"),
        "la.png": rgb.convert("LA"),
        "one.png": rgb.convert("1"),
        "cmyk.tiff": rgb.convert("CMYK"),
        "ycbcr.jpg": rgb,
        "rgb.gif": rgb,
        "rgb.bmp": rgb,
        "rgb.webp": rgb,
        "rgb.ppm": rgb,
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        pixels = load_image(str(tmp_path / name), "here")
        assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3), name


# ----------------------------------------------------------------------------------------------------------
# Skip accounting at the end of a finite stream
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_records_skipped_after_the_last_batch_are_counted(tmp_path, tokenizer, model_config, drop_remainder):
    """5 good records then 3 bad ones, batches of 2: before, the 3 (and with drop_remainder the skips before the
    dropped fifth row) were only logged; now the last batch counts them."""
    good = [{"question": f"q{k}", "answer": str(k), "id": f"g{k}"} for k in range(5)]
    bad = ['{"question": "q", "answer": NaN}', {"question": "q", "answer": "1", "bbox": 5}, "not json"]
    write_lines(tmp_path / "d.jsonl", [good[0], bad[1], *good[1:], *bad])
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    batches = list(skip_pipeline([source], tokenizer, model_config, shuffle=False, drop_remainder=drop_remainder))
    assert [len(b["examples"]) for b in batches] == ([2, 2] if drop_remainder else [2, 2, 1])
    assert skip_totals(batches) == {"parse": 2, "field": 2, "missing_image": 0, "bad_image": 0, "too_long": 0}
    assert pipeline.skip_metrics(skip_totals(batches))["data/skipped"] == 4.0


@pytest.mark.slow  # spawns two grain worker processes (each imports jax)
def test_trailing_skips_are_counted_with_worker_processes(tmp_path, tokenizer, model_config):
    """Each grain worker ends its own share of the stream: every worker's trailing skips reach the batches."""
    records = [{"question": f"q{k}", "answer": str(k)} if k % 3 else "bad json" for k in range(14)] + ["bad"] * 3
    write_lines(tmp_path / "d.jsonl", records)
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    batches = list(skip_pipeline([source], tokenizer, model_config, worker_processes=2, batch_size=3))
    assert skip_totals(batches)["parse"] == 8 and all(len(b["examples"]) == 3 for b in batches)


def test_skip_counts_survive_a_resume_at_every_batch(tmp_path, tokenizer, model_config):
    records = []
    for k in range(11):
        records.append({"question": f"q{k}", "answer": str(k)} if k % 3 else '{"question": broken')
    write_lines(tmp_path / "d.jsonl", records)
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")

    def run(**kw):
        return skip_pipeline([source], tokenizer, model_config, seed=5, batch_size=3, **kw)

    whole = list(run())
    assert skip_totals(whole)["parse"] == 4
    for cut in range(len(whole) + 1):
        it = iter(run())
        head = [next(it) for _ in range(cut)]
        resumed = iter(run())
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(resumed)
        assert [b["examples"] for b in head + rest] == [b["examples"] for b in whole]
        assert skip_totals(head + rest) == skip_totals(whole)


def test_a_state_saved_before_the_stream_end_stage_still_restores(tmp_path, tokenizer, model_config):
    write_lines(tmp_path / "d.jsonl", [{"question": f"q{k}", "answer": str(k)} for k in range(6)])
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    it = iter(skip_pipeline([source], tokenizer, model_config, shuffle=False))
    next(it)
    legacy = it.get_state()["pipeline"]  # what TrainCheckpointer saved before: the prefetch / batch stage's state
    resumed = iter(skip_pipeline([source], tokenizer, model_config, shuffle=False))
    resumed.set_state(legacy)
    assert [ex["id"] for b in resumed for ex in b["examples"]] == [f"{tmp_path / 'd.jsonl'}:{k}" for k in range(3, 7)]


@pytest.mark.parametrize(
    "name, content, hint",
    [
        ("utf16.jsonl", '{"question": "q", "answer": "1"}\n'.encode("utf-16") * 3, "UTF-16"),
        ("gz.jsonl", gzip.compress(b'{"question": "q", "answer": "1"}\n' * 3), "gzip-compressed"),
        ("cr.jsonl", b'{"question": "q", "answer": "1"}\r' * 3, "CR-only line ends"),
        ("bad.jsonl", b'{"question": "q", "answer": NaN}\n' * 3, "NaN"),
    ],
    ids=["utf16", "gzip", "cr", "nan"],  # not the bytes: gzip's header holds the time, and xdist workers must agree
)
def test_a_stream_whose_every_record_is_bad_is_an_error_not_empty(
    tmp_path, tokenizer, model_config, name, content, hint
):
    (tmp_path / name).write_bytes(content)
    source = JsonlSource(tmp_path / name, answer_type="number")
    it = iter(skip_pipeline([source], tokenizer, model_config, shuffle=False))
    with pytest.raises(
        DataError, match=r"data: the stream ended with no usable record: \d+ records were skipped"
    ) as info:
        next(it)
    assert str(tmp_path / name) in str(info.value) and hint in str(info.value)
    assert info.value.kind == "parse"


def test_too_few_usable_records_for_one_batch_after_skips_is_an_error(tmp_path, tokenizer, model_config):
    write_lines(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, "oops", "oops"])
    source = JsonlSource(tmp_path / "d.jsonl", answer_type="number")
    with pytest.raises(
        DataError, match=r"1 usable records, fewer than one batch of 2: 2 records were skipped \(parse: 2\)"
    ):
        next(iter(skip_pipeline([source], tokenizer, model_config)))
    # Without skips a short stream is just short (nothing says the data is bad).
    write_lines(tmp_path / "ok.jsonl", [{"question": "q", "answer": "1"}])
    assert list(skip_pipeline([JsonlSource(tmp_path / "ok.jsonl")], tokenizer, model_config)) == []


def test_data_error_keeps_its_kind_through_pickling():
    error = pickle.loads(pickle.dumps(DataError("f.jsonl:3: field 'images': gone", kind="missing_image")))
    assert isinstance(error, DataError) and error.kind == "missing_image" and str(error).startswith("f.jsonl:3:")


def test_the_file_index_reads_a_huge_single_line_in_blocks(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"  \n" + b"x" * (3 << 20) + b"\n\n" + b'{"question": "q", "answer": "1"}')
    source = JsonlSource(tmp_path / "d.jsonl")
    assert len(source) == 2 and [source.line_number(k) for k in range(2)] == [2, 4]
    assert fails(source, 0).kind == "parse" and source[1]["answer"] == "1"
    assert os.path.getsize(tmp_path / "d.jsonl") > 3 << 20


@pytest.mark.slow  # builds the runtime (tokenizer, model); the pipeline-level checks above stay in the fast tier
def test_a_training_stage_whose_every_record_is_bad_fails_instead_of_finishing(tmp_path):
    """Before: 0 steps, exit 0, an untrained final_model/ and the stage marked done (so a re-run with the fixed file
    trained nothing). Now the run stops with the DataError and nothing is marked or exported."""
    from jaxvlm import configuration, runtime, trainer
    from jaxvlm.configuration import gym_source, stage

    (tmp_path / "utf16.jsonl").write_bytes('{"question": "q", "answer": "1"}\n'.encode("utf-16") * 4)
    c = configuration.base_config()
    c.mesh.shape = (1, 1, 1)
    c.train.progress = False
    c.eval.update(sources=[gym_source("validation", 4, tasks=("exists",))], num_examples=2, batch_size=2)
    c.stage_order = ("sft",)
    source = {"kind": "jsonl", "path": str(tmp_path / "utf16.jsonl"), "answer_type": "number"}
    data = dict(sources=[source], batch_size=2, on_error="skip", prefetch=0, num_threads=1, prompt_style="plain")
    c.stages.sft = stage("sft", steps=0, epochs=1, data=data)
    workdir = tmp_path / "work"
    with pytest.raises(DataError, match=r"no usable record: \d+ records were skipped \(parse: \d+\).*UTF-16"):
        trainer.run(c, str(workdir))
    assert not (workdir / "final_model").exists()
    assert runtime.load_progress(str(workdir))["completed"] == {}
