"""What a run sets up from its config before any stage: tokenizer, model (one builder for the trainer, evaluation,
the benchmarks and the forward check), image processor, mesh, metrics writer; and the run's plumbing (stop signals,
progress file)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxvlm import models, sharding
from jaxvlm.configuration import ConfigError, ModelSpec, RunSpec
from jaxvlm.metrics import MetricsWriter
from jaxvlm.processing.image import ImageProcessor

PROGRESS_FILE = "progress.json"


def model_config(spec: ModelSpec, tokenizer=None) -> models.ModelConfig:
    """The ModelConfig of `config.model`: the checkpoint's config.json, or the preset (its token ids taken from
    `tokenizer` when given, e.g. the built-in gym tokenizer), with the model options on top."""
    if spec.path:
        return models.load_hf_config(spec.path, **spec.overrides)
    cfg = models.preset(spec.preset, **spec.overrides)
    if tokenizer is not None:
        from jaxvlm.tokenizer import configure_model_for_tokenizer

        cfg = configure_model_for_tokenizer(cfg, tokenizer)
    return cfg


def build_model(spec: ModelSpec, seed: int, tokenizer=None, *, abstract: bool = False) -> tuple[models.Qwen25VL, Any]:
    """The model and params of `config.model`: a checkpoint's weights, or a preset's random weights (`seed`);
    `abstract=True`: shapes and dtypes only (nothing is read or allocated)."""
    if abstract:
        cfg = model_config(spec, tokenizer)
        return models.Qwen25VL(cfg), models.abstract_params(cfg)
    if spec.path:
        return models.load_pretrained(spec.path, **spec.overrides)
    cfg = model_config(spec, tokenizer)
    return models.Qwen25VL(cfg), models.init_params(cfg, seed)


def build_tokenizer(spec: ModelSpec, workdir: str):
    """`config.model.tokenizer`, else the checkpoint's, else the built-in gym tokenizer (written into workdir)."""
    from transformers import AutoTokenizer

    from jaxvlm.tokenizer import builtin_tokenizer

    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    if spec.path:
        return AutoTokenizer.from_pretrained(spec.path)
    suffix = f"-{jax.process_index()}" if jax.process_count() > 1 else ""  # no two writers on one directory
    return builtin_tokenizer(os.path.join(workdir, "tokenizer" + suffix))


def build_image_processor(spec: ModelSpec, model_config: models.ModelConfig) -> ImageProcessor | None:
    """The checkpoint's image processor (or one matching the preset's vision tower) with the config's pixel bounds;
    None for a text-only model."""
    vc = model_config.vision
    if vc is None:
        return None
    if spec.path and os.path.isfile(os.path.join(spec.path, "preprocessor_config.json")):
        return dataclasses.replace(
            ImageProcessor.from_pretrained(spec.path), min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
        )
    return ImageProcessor(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
    )


def build_mesh(shape) -> jax.sharding.Mesh:
    """The ("data", "fsdp", "tensor") mesh of `config.mesh.shape` (a shape without -1 may use the first devices
    only, e.g. (1, 1, 1) on a multi-device host)."""
    shape = tuple(int(d) for d in shape)
    devices = jax.devices()
    if -1 not in shape and math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f"config.mesh.shape: {shape} uses {math.prod(shape)} of the {len(devices)} devices of a "
                f"{jax.process_count()}-process run; every process needs devices in the mesh (e.g. (1, -1, 1))"
            )
        devices = devices[: math.prod(shape)]
    return sharding.make_mesh(shape, devices)


@dataclasses.dataclass
class Runtime:
    """What every stage shares."""

    spec: RunSpec
    workdir: str
    model: models.Qwen25VL
    tokenizer: Any
    image_processor: ImageProcessor | None
    mesh: jax.sharding.Mesh
    writer: MetricsWriter
    init_params: Any

    @property
    def model_config(self) -> models.ModelConfig:
        return self.model.config

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def model_source(self) -> str:
        return self.spec.model.path or f"preset:{self.spec.model.preset}"

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def setup(spec: RunSpec, workdir: str) -> Runtime:
    """Tokenizer, model (checkpoint or preset with random weights), image processor, mesh, metrics writer."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer = build_tokenizer(spec.model, workdir)
    model, params = build_model(spec.model, spec.seed, None if spec.model.path else tokenizer)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, tensorboard=spec.train.tensorboard)
    return Runtime(
        spec,
        workdir,
        model,
        tokenizer,
        build_image_processor(spec.model, model.config),
        build_mesh(spec.mesh_shape),
        writer,
        params,
    )


# ----------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------


def any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


class StopSignal:
    """SIGTERM / SIGINT set a flag (checked between steps) instead of killing the process mid-write."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signum
        logging.warning("received signal %d: checkpointing after this step", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return any_process(self.received is not None)


def load_progress(workdir: str) -> dict:
    """{"completed": {stage: steps}} of a run in `workdir` (empty for a new run)."""
    path = os.path.join(workdir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return {"completed": {}}
    with open(path) as f:
        return json.load(f)


def save_progress(rt: Runtime, progress: dict) -> None:
    if rt.is_main:
        tmp = os.path.join(rt.workdir, PROGRESS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(progress, f, indent=2)
        os.replace(tmp, os.path.join(rt.workdir, PROGRESS_FILE))
