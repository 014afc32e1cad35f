"""Data sources from config entries, and the whole input pipeline from a config's `data` section.

A source entry is a dict with a `kind`:

    {"kind": "gym", "split": "train", "num_examples": 2000, "tasks": ["exists", "count"], "image_size": 56,
     "seed": 0, "difficulties": [0, 1], "weight": 1.0}
    {"kind": "jsonl", "path": "/data/train.jsonl", "record_format": "jaxvlm" | "r1v", "answer_type": "number",
     "image_root": "", "weight": 1.0}
    {"kind": "tfds", "data_dir": "/data/tfds", "split": "train", "image_size": 56,
     "num_examples": {"train": 2000, "validation": 200, "test": 200}, "weight": 1.0}

Several entries are mixed by `weight`. A wrong kind or key fails here, naming the entry, before any training.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxvlm import checks
from jaxvlm.data.pipeline import BatchCollator, ExampleEncoder, PipelineConfig, build_dataset

SOURCE_KINDS = ("gym", "jsonl", "tfds")
_COMMON_KEYS = ("kind", "weight")


def _gym_config_keys() -> tuple[str, ...]:
    from jaxvlm.data.gym import GymConfig

    return tuple(inspect.signature(GymConfig).parameters)


def _check_keys(entry: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(entry) - set(allowed) - set(_COMMON_KEYS))
    if unknown:
        known = sorted(set(allowed) | set(_COMMON_KEYS))
        raise checks.FieldError(unknown[0], f"not a key of a {entry['kind']!r} source, which takes {known}")


def _gym_rules() -> dict[str, checks.Rule]:
    from jaxvlm.data.gym import SPLITS

    return {"split": checks.one_of(*SPLITS), "num_examples": checks.integer(1)}


def check_entry(entry: Mapping[str, Any]) -> None:
    """One source entry checked without reading its data or touching files: kind, keys, value types and ranges
    (`check_entry_files` checks the files). `checks.FieldError` names the offending key; a gym setting out of range is
    a ValueError naming it."""
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise checks.FieldError("kind", f"must be one of {SOURCE_KINDS}, got {kind!r}")
    if "weight" in entry:
        checks.check_fields(entry, {"weight": checks.number(0, lo_open=True)})
    if kind == "gym":
        from jaxvlm.data.gym import GymConfig

        _check_keys(entry, ("split", "num_examples", *_gym_config_keys()))
        if "num_examples" not in entry:
            raise checks.FieldError("num_examples", "a gym source needs it")
        checks.check_fields(entry, {k: rule for k, rule in _gym_rules().items() if k in entry})
        GymConfig(**{k: v for k, v in entry.items() if k in _gym_config_keys()})
    elif kind == "jsonl":
        from jaxvlm.data.example import ANSWER_TYPES
        from jaxvlm.data.jsonl import RECORD_FORMATS

        _check_keys(entry, ("path", "record_format", "answer_type", "image_root"))
        rules = {
            "path": checks.text,
            "record_format": checks.one_of(*RECORD_FORMATS),
            "answer_type": checks.one_of(*ANSWER_TYPES),
            "image_root": checks.text,
        }
        checks.check_fields(entry, {k: rule for k, rule in rules.items() if k in entry})
        if not entry.get("path"):
            raise checks.FieldError("path", "a jsonl source needs it")
    else:
        from jaxvlm.data.gym import GymConfig

        gym_keys = _gym_config_keys()
        _check_keys(entry, ("data_dir", "split", "num_examples", "name", *gym_keys))
        if not entry.get("data_dir") or not isinstance(entry["data_dir"], str):
            raise checks.FieldError("data_dir", "a tfds source needs it (a directory path)")
        sizes = entry.get("num_examples")
        if isinstance(sizes, Mapping):
            for split, n in sizes.items():
                checks.check_fields({f"num_examples.{split}": n}, {f"num_examples.{split}": checks.integer(1)})
        elif sizes is not None:
            checks.check_fields(entry, {"num_examples": checks.integer(1)})
        if "split" in entry:
            checks.check_fields(entry, {"split": _gym_rules()["split"]})
        GymConfig(**{k: v for k, v in entry.items() if k in gym_keys})


def check_entry_files(entry: Mapping[str, Any]) -> None:
    """The files a checked entry names exist (a JSONL file and its image root; a tfds directory may be built)."""
    if entry["kind"] == "jsonl":
        if not os.path.isfile(entry["path"]):
            raise checks.FieldError("path", f"{entry['path']}: file not found")
        if entry.get("image_root") and not os.path.isdir(entry["image_root"]):
            raise checks.FieldError("image_root", f"{entry['image_root']}: directory not found")


def make_source(entry: Mapping[str, Any], where: str = "data.sources[0]", *, max_image_pixels: int | None = None):
    """A random-access source (len + getitem -> example dict) for one config entry (checked by `check_entry`;
    a ValueError names `where` and the key). `max_image_pixels`: the largest image a JSONL source loads
    (`data.max_image_pixels`; None: its default)."""
    entry = dict(entry)
    try:
        check_entry(entry)
        check_entry_files(entry)
    except checks.FieldError as error:
        raise ValueError(f"{where}.{error.field}: {error.message}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None
    kind = entry["kind"]
    if kind == "gym":
        from jaxvlm.data.gym import GymConfig, GymSource

        gym_keys = _gym_config_keys()
        config = GymConfig(**{k: v for k, v in entry.items() if k in gym_keys})
        return GymSource(entry.get("split", "train"), int(entry["num_examples"]), config)
    if kind == "jsonl":
        from jaxvlm.data.jsonl import JsonlSource

        limit = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
        return JsonlSource(
            entry["path"],
            record_format=entry.get("record_format", "jaxvlm"),
            answer_type=entry.get("answer_type", "string"),
            image_root=entry.get("image_root") or None,
            **limit,
        )
    from jaxvlm.data import tfds_gym

    return tfds_gym.gym_data_source(**{k: v for k, v in entry.items() if k not in _COMMON_KEYS})


def source_weights(entries: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """The mixing weights of the entries (None for a single source)."""
    if len(entries) < 2:
        return None
    return [float(entry.get("weight", 1.0)) for entry in entries]


def input_pipeline(data_config: Mapping[str, Any], tokenizer, image_processor, model_config, **overrides):
    """The grain `IterDataset` of batches for a config's `data` section (`sources` + PipelineConfig fields).

    `overrides` replace PipelineConfig fields (e.g. `with_targets=True` for an SFT stage).
    """
    values = dict(data_config)
    entries = [dict(e) for e in values.pop("sources", ())]
    if not entries:
        raise ValueError("data.sources is empty: give at least one source")
    config = PipelineConfig.from_dict({**values, **overrides})
    sources = [
        make_source(entry, f"data.sources[{k}]", max_image_pixels=config.max_image_pixels)
        for k, entry in enumerate(entries)
    ]
    encoder = ExampleEncoder(tokenizer, image_processor if model_config.vision is not None else None, config)
    collator = BatchCollator(
        config,
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=model_config.image_token_id,
        vision_config=model_config.vision,
    )
    return build_dataset(sources, config, encoder, collator, weights=source_weights(entries))
