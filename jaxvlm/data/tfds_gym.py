"""The gym as a tensorflow-datasets builder (`jaxvlm_gym`), stored as array_record and read back without TensorFlow.

    from jaxvlm.data.tfds_gym import JaxvlmGym, JaxvlmGymConfig, gym_data_source, load_gym_split
    builder = JaxvlmGym(config="default", data_dir=DIR)               # or config=JaxvlmGymConfig(name=..., ...)
    builder.download_and_prepare()                                     # generates; nothing is downloaded
    source = load_gym_split(DIR, "train", "default")                  # grain source of example dicts
    source = gym_data_source(DIR, "train", {"train": 500, "validation": 50, "test": 50}, tasks=["count"])

Each split holds exactly the examples of `GymSource(split, <size>, config.gym_config())`, in the same order
(shuffling is disabled): `load_gym_split(...)[i] == GymSource(...)[i]` field by field, images bit for bit.

Feature encoding (chosen so that writing and reading need no TensorFlow):
  images       Sequence(Tensor(uint8 [S, S, 3], encoding="zlib")): raw pixels, zlib-compressed per image. The
               `tfds.features.Image` feature needs TensorFlow to encode PNG; a zlib Tensor round-trips exactly,
               decodes with numpy alone, and shrinks the flat-coloured gym images well (the default
               build, 2400 examples at 56 px, takes under 2 MB).
  strings      Text(): stored as UTF-8, read back by the array_record source as bytes (decoded here).
  bbox         Sequence(Scalar float32): 4 values for grounding examples, none otherwise (the example's [] / 4).
  options      Sequence(Text()).
  difficulty   Scalar(int32).
A custom configuration must carry its own `name`: the prepared data lives in DATA_DIR/jaxvlm_gym/<name>/1.0.0, and
a name that is already prepared is reused as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxvlm.data.gym import SPLITS, TASKS, GymConfig, GymSource

TEXT_FIELDS = ("id", "question", "answer", "answer_type", "task", "reasoning", "caption", "source")


_DEFAULT_GYM = GymConfig()


@dataclasses.dataclass(eq=False)
class JaxvlmGymConfig(tfds.core.BuilderConfig):
    """A gym build: the `GymConfig` fields and the number of examples of each split."""

    image_size: int = _DEFAULT_GYM.image_size
    seed: int = _DEFAULT_GYM.seed
    tasks: tuple[str, ...] = TASKS
    difficulties: tuple[int, ...] = _DEFAULT_GYM.difficulties
    shape_counts: tuple[tuple[int, int], ...] = _DEFAULT_GYM.shape_counts
    split_fractions: tuple[float, float, float] = _DEFAULT_GYM.split_fractions
    candidates_per_example: int = _DEFAULT_GYM.candidates_per_example
    train_size: int = 2000
    validation_size: int = 200
    test_size: int = 200

    def gym_config(self) -> GymConfig:
        return GymConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(GymConfig)})

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}[split]

    def content(self) -> dict[str, Any]:
        """What the build holds (GymConfig fields and split sizes), as plain JSON values."""
        gym = dataclasses.asdict(self.gym_config())
        return json.loads(json.dumps({**gym, **{f"{s}_size": self.split_size(s) for s in SPLITS}}))


class JaxvlmGym(tfds.core.GeneratorBasedBuilder):
    """jaxvlm's procedurally generated visual-reasoning gym (see `jaxvlm.data.gym`); written as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: nine tasks, images as zlib-compressed uint8 tensors."}
    BUILDER_CONFIGS = [
        JaxvlmGymConfig(name="default", description="56x56 images; 2000 / 200 / 200 examples."),
        JaxvlmGymConfig(name="gym112", image_size=112, description="112x112 images; 2000 / 200 / 200 examples."),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, file_format: str = "array_record", **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. tfds' own lookup needs the `importlib_resources` backport, which is not a dependency."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = {name: tfds.features.Text() for name in TEXT_FIELDS}
        features.update(
            images=tfds.features.Sequence(tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="zlib")),
            difficulty=tfds.features.Scalar(dtype=np.int32),
            bbox=tfds.features.Sequence(tfds.features.Scalar(dtype=np.float32)),
            options=tfds.features.Sequence(tfds.features.Text()),
        )
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        source = GymSource(split, config.split_size(split), config.gym_config())
        for index in range(len(source)):
            yield index, example_to_record(source[index])


def example_to_record(example: dict[str, Any]) -> dict[str, Any]:
    """A gym example as the builder's features."""
    record = {name: example[name] for name in TEXT_FIELDS}
    record.update(
        images=[np.asarray(image, np.uint8) for image in example["images"]],
        difficulty=int(example["difficulty"]),
        bbox=[float(v) for v in example["bbox"]],
        options=list(example["options"]),
    )
    return record


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_example(record: dict[str, Any]) -> dict[str, Any]:
    """A record read from the array_record data source (strings as bytes) as a jaxvlm example dict."""
    example = {name: _text(record[name]) for name in TEXT_FIELDS}
    example.update(
        images=[np.asarray(image, np.uint8) for image in record["images"]],
        difficulty=int(record["difficulty"]),
        bbox=[float(v) for v in record["bbox"]],
        options=[_text(option) for option in record["options"]],
    )
    return example


class GymRecordSource:
    """A grain random-access source over a prepared split: `source[i]` is the example dict (record decoded)."""

    def __init__(self, records, description: str):
        self.records = records
        self.description = description

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return record_to_example(self.records[index])

    def __repr__(self) -> str:
        return f"GymRecordSource({self.description}, num_examples={len(self)})"


def load_gym_split(
    data_dir: str, split: str, config: str | JaxvlmGymConfig = "default", prepare: bool = True
) -> GymRecordSource:
    """The prepared `split` of the gym build `config` under `data_dir` (generated first when missing and
    `prepare`), as a grain source of example dicts; `.records` is tfds' raw `as_data_source` source."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    builder = JaxvlmGym(config=config, data_dir=data_dir)
    if prepare:
        builder.download_and_prepare()
    name = builder.builder_config.name
    return GymRecordSource(builder.as_data_source(split), f"{data_dir}/jaxvlm_gym/{name}, split={split!r}")


def gym_data_source(
    data_dir: str,
    split: str = "train",
    num_examples: int | Mapping[str, int] | None = None,
    name: str | None = None,
    **gym_kwargs: Any,
) -> GymRecordSource:
    """`load_gym_split` from a config file's entry: `gym_kwargs` are GymConfig fields, `num_examples` maps split
    names to sizes (an int sets `split`'s size; missing sizes keep the defaults 2000 / 200 / 200).

    Without `name`, the build is named after its content ("default" for the default build, else
    "custom_<hash>"), so two different builds never share (and silently reuse) one directory.
    """
    if isinstance(num_examples, Mapping):
        unknown = sorted(set(num_examples) - set(SPLITS))
        if unknown:
            raise ValueError(f"num_examples has unknown split(s) {unknown} (known: {', '.join(SPLITS)})")
        sizes = {f"{s}_size": int(n) for s, n in num_examples.items()}
    else:
        sizes = {} if num_examples is None else {f"{split}_size": int(num_examples)}
    gym = dataclasses.asdict(GymConfig(**gym_kwargs))  # validates the gym fields
    config = JaxvlmGymConfig(name=name or "unnamed", **gym, **sizes)
    if name is None:
        content = config.content()
        if content == JaxvlmGym.builder_configs["default"].content():
            config.name = "default"
        else:
            config.name = "custom_" + hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    return load_gym_split(data_dir, split, config)
