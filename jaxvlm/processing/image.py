"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL image preprocessing in numpy + PIL.

An exact port of the math of transformers' `Qwen2VLImageProcessorPil`
(`image_processing_pil_qwen2_vl.py` with the `PilBackend` helpers), the image processor of all three families
(transformers 5 maps `qwen3_vl` to it too; Qwen3-VL's preprocessor_config.json only changes its settings:
patch_size 16, so a resize factor of 32, and mean = std = 0.5):

1. convert to RGB (transparent pixels are composited onto white; 16-bit greyscale, which transformers clips to
   white, is scaled to 8 bits instead, see `pil_to_rgb`),
2. resize with PIL bicubic to `smart_resize(h, w)` so both sides are
   multiples of `patch_size * merge_size`,
3. rescale (`uint8 -> float64 * rescale_factor -> float32`),
4. normalise with the mean / std (CLIP's for Qwen2-VL / Qwen2.5-VL, 0.5 for Qwen3-VL),
5. cut into `patch_size x patch_size` patches, repeat each still image over
   `temporal_patch_size` frames and flatten so the `merge_size x merge_size`
   patches that the vision tower merges into one LLM token are contiguous.

The output matches transformers bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN3_VL_IMAGE_MEAN = (0.5, 0.5, 0.5)  # Qwen3-VL's preprocessor_config.json: image_mean = image_std = 0.5
QWEN3_VL_IMAGE_STD = (0.5, 0.5, 0.5)
# (image_mean, image_std) of each vision family's image processor, by model_type.
FAMILY_NORMALIZATION = {
    "qwen2_5_vl": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "qwen3_vl": (QWEN3_VL_IMAGE_MEAN, QWEN3_VL_IMAGE_STD),
}
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGE_PROCESSOR_TYPE = "Qwen2VLImageProcessor"
PIL_BICUBIC = 3
MAX_ASPECT_RATIO = 200

# PIL modes `Image.convert("RGB")` maps faithfully (alpha modes are composited onto white first).
RGB_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA")
# Greyscale modes with 16-bit samples (PNG and TIFF 16-bit greyscale; "I" holds 32-bit ints, read as 16-bit).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Target `(height, width)` for an image, as Qwen2-VL computes it.

    Both sides become multiples of `factor`, the pixel count lands in
    `[min_pixels, max_pixels]` and the aspect ratio is kept as closely as
    possible.  Raises `ValueError` if the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} for height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _describe(image: Any) -> str:
    """Short description of an unsupported input, for error messages."""
    if isinstance(image, np.ndarray):
        return f"numpy array with dtype={image.dtype} and shape={image.shape}"
    return f"object of type {type(image).__module__}.{type(image).__qualname__}"


def _check_numpy_image(image: np.ndarray) -> None:
    """Validate a numpy image: uint8, `[H, W]` or `[H, W, C]` with C in (1, 3, 4)."""
    if image.dtype != np.uint8:
        raise TypeError(
            f"numpy images must have dtype uint8 (values 0..255), got {_describe(image)}; "
            "convert with (x * 255).round().astype(np.uint8) if you have floats in [0, 1]"
        )
    if image.ndim == 2:
        return
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"numpy images must be channels-last [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}"
        )


def sixteen_bit_to_uint8(samples: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535, any int dtype) -> uint8 with `round(v * 255 / 65535)`, the full range kept."""
    return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a 16-bit greyscale image; a transparency key (tRNS) becomes white."""
    samples = np.asarray(image)
    if samples.size and (int(samples.min()) < 0 or int(samples.max()) > 65535):
        raise ValueError(
            f"image mode {image.mode!r} has values {int(samples.min())}..{int(samples.max())}, outside the 16-bit "
            "range 0..65535 it is read in; save it as 8- or 16-bit"
        )
    grey = sixteen_bit_to_uint8(samples)
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        grey = np.where(samples == transparency, np.uint8(255), grey)
    return np.repeat(grey[..., None], 3, axis=-1)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """RGB pixels of a PIL image as uint8 `[H, W, 3]`; ValueError naming a mode with no faithful conversion.

    Modes in RGB_CONVERTIBLE_MODES go through PIL's `convert` exactly as transformers does, those with an alpha
    band or a transparency key alpha-composited onto opaque white. 16-bit greyscale (SIXTEEN_BIT_MODES) is scaled
    to 8 bits as `round(v * 255 / 65535)`, where PIL's convert (and so transformers) clips every value over 255 to
    white. Mode "F" (float samples, no fixed range) and any other mode are rejected by name.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_grey_to_rgb(image)
    if mode not in RGB_CONVERTIBLE_MODES:
        hint = "float samples have no fixed 0..255 range" if mode == "F" else "no faithful conversion to RGB"
        raise ValueError(f"image mode {mode!r} is not supported ({hint}); save the image as 8-bit RGB or greyscale")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def convert_to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB pixels of `image` as uint8 `[H, W, 3]`, as transformers converts them.

    PIL images: `pil_to_rgb` (transformers' conversion, except that 16-bit greyscale is scaled rather than clipped
    to white, and modes without a faithful conversion are rejected). uint8 numpy images: `[H, W]` / `[H, W, 1]` are
    repeated to 3 channels, `[H, W, 4]` is blended onto white with `round(a * rgb + (1 - a) * 255)` (transformers'
    numpy path), `[H, W, 3]` is returned unchanged.
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        _check_numpy_image(image)
        pixels = image[..., None] if image.ndim == 2 else image
        num_channels = pixels.shape[-1]
        if num_channels == 1:
            return np.repeat(pixels, 3, axis=-1)
        if num_channels == 4:
            alpha = pixels[..., 3:4] / 255
            composite = alpha * pixels[..., :3] + (1 - alpha) * 255
            return np.round(composite).astype(np.uint8)
        return pixels
    raise TypeError(f"images must be PIL.Image.Image or uint8 numpy arrays, got {_describe(image)}")


def as_channels_last(image: Image.Image | np.ndarray) -> np.ndarray:
    """Pixels of `image` without colour conversion, uint8 `[H, W, C]` (`do_convert_rgb=False`)."""
    if isinstance(image, Image.Image):
        pixels = np.array(image)
        if pixels.dtype != np.uint8:
            raise TypeError(f"PIL image of mode {image.mode!r} does not give uint8 pixels; use do_convert_rgb=True")
    elif isinstance(image, np.ndarray):
        _check_numpy_image(image)
        pixels = image
    else:
        raise TypeError(f"images must be PIL.Image.Image or uint8 numpy arrays, got {_describe(image)}")
    return pixels[..., None] if pixels.ndim == 2 else pixels


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of uint8 `[H, W, C]` pixels to uint8 `[height, width, C]`."""
    single_channel = pixels.shape[-1] == 1
    pil_image = Image.fromarray(pixels[..., 0] if single_channel else pixels)
    resized = np.array(pil_image.resize((width, height), resample=Image.Resampling.BICUBIC))
    return resized[..., None] if resized.ndim == 2 else resized


def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """`pixels * factor` computed in float64 and cast to float32 (transformers' order)."""
    return (pixels.astype(np.float64) * factor).astype(np.float32)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`(pixels - mean) / std` per channel on `[H, W, C]`, in float32 (or the input float dtype)."""
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    num_channels = pixels.shape[-1]
    if len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(
            f"image has {num_channels} channels but image_mean has {len(mean)} and image_std has {len(std)} values"
        )
    return (pixels - np.array(mean, dtype=pixels.dtype)) / np.array(std, dtype=pixels.dtype)


def patchify(
    pixels: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, int, int]:
    """Flatten one still image `[H, W, C]` into Qwen2-VL patches.

    Returns `(patches, grid_h, grid_w)` with `patches` float32
    `[grid_h * grid_w, C * temporal_patch_size * patch_size * patch_size]`,
    `grid_h = H // patch_size`, `grid_w = W // patch_size`.  Rows are ordered
    `(grid_h / merge, grid_w / merge, merge_h, merge_w)`, so each
    `merge_size**2` block of rows is one LLM token; within a row the order is
    `(C, T, patch_h, patch_w)`, the frame repeated over T.
    """
    height, width, channels = pixels.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(
            f"image of size {height}x{width} cannot be patchified: both sides must be multiples of "
            f"patch_size * merge_size = {unit} (enable do_resize or resize it yourself)"
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = np.asarray(pixels, dtype=np.float32).reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, channels
    )
    # -> (gh, gw, mh, mw, C, ph, pw)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, *blocks.shape[5:]))
    patches = frames.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(patches), grid_h, grid_w


def _read_pixel_bounds(config: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """`(min_pixels, max_pixels)` from a preprocessor config; top-level keys win over `size`."""
    size = config.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"preprocessor config field 'size' must be a dict, got {size!r}")
    min_pixels = size.get("shortest_edge", size.get("min_pixels", default_min))
    max_pixels = size.get("longest_edge", size.get("max_pixels", default_max))
    if config.get("min_pixels") is not None:
        min_pixels = config["min_pixels"]
    if config.get("max_pixels") is not None:
        max_pixels = config["max_pixels"]
    return int(min_pixels), int(max_pixels)


@dataclasses.dataclass
class ImageProcessor:
    """Torch-free Qwen2-VL image processor (same outputs as `Qwen2VLImageProcessorPil`).

    `processor(images)` returns `pixel_values` float32
    `[sum_i grid_h_i * grid_w_i, C * temporal_patch_size * patch_size**2]`
    (`[N, 1176]` with the defaults) and `image_grid_thw` int64 `[num_images, 3]`.
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ImageProcessor.{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"ImageProcessor.min_pixels={self.min_pixels} is larger than max_pixels={self.max_pixels}")
        if len(self.image_mean) != len(self.image_std):
            raise ValueError(f"image_mean has {len(self.image_mean)} values but image_std has {len(self.image_std)}")

    @property
    def resize_factor(self) -> int:
        """Side lengths are resized to multiples of this (`patch_size * merge_size`)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, `3 * temporal_patch_size * patch_size**2` (1176)."""
        return len(self.image_mean) * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """Build from a `preprocessor_config.json` dict (unknown keys are ignored).

        Pixel bounds come from `min_pixels` / `max_pixels` or
        `size: {shortest_edge, longest_edge}`.  A `resample` other than bicubic
        (3) is rejected because the port only implements bicubic.
        """
        resample = config.get("resample", PIL_BICUBIC)
        if resample != PIL_BICUBIC:
            raise ValueError(
                f"preprocessor config has resample={resample!r}; only PIL bicubic ({PIL_BICUBIC}) is supported"
            )
        defaults = cls()
        min_pixels, max_pixels = _read_pixel_bounds(config, defaults.min_pixels, defaults.max_pixels)
        fields = {
            field.name: config[field.name]
            for field in dataclasses.fields(cls)
            if field.name not in ("min_pixels", "max_pixels") and config.get(field.name) is not None
        }
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **fields)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessor:
        """Load `path/preprocessor_config.json` (or the json file `path` itself).

        A checkpoint directory without that file gives the default processor.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            config_path = os.path.join(path, PREPROCESSOR_CONFIG_NAME)
            if not os.path.exists(config_path):
                return cls()
        elif os.path.isfile(path):
            config_path = path
        else:
            raise FileNotFoundError(f"ImageProcessor.from_pretrained: no such directory or file: {path!r}")
        with open(config_path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` dict that transformers' Qwen2-VL processors accept."""
        return {
            "image_processor_type": IMAGE_PROCESSOR_TYPE,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "resample": PIL_BICUBIC,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write `path/preprocessor_config.json`; returns the file path."""
        os.makedirs(path, exist_ok=True)
        config_path = os.path.join(os.fspath(path), PREPROCESSOR_CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return config_path

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """`(height, width)` an image of that size is resized to (unchanged if `do_resize=False`)."""
        if not self.do_resize:
            return height, width
        return smart_resize(
            height, width, factor=self.resize_factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """`(t, grid_h, grid_w)` patch grid for a still image of `height x width` pixels."""
        resized_height, resized_width = self.resized_size(height, width)
        return 1, resized_height // self.patch_size, resized_width // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """LLM tokens (`<|image_pad|>` copies) for an image of `height x width` pixels."""
        t, grid_h, grid_w = self.grid_thw(height, width)
        return t * grid_h * grid_w // self.merge_size**2

    def preprocess_one(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (`patches` float32 `[grid_h * grid_w, patch_dim]`, `(1, grid_h, grid_w)`)."""
        pixels = convert_to_rgb(image) if self.do_convert_rgb else as_channels_last(image)
        if self.do_resize:
            height, width = self.resized_size(pixels.shape[0], pixels.shape[1])
            pixels = resize_bicubic(pixels, height, width)
        if self.do_rescale:
            pixels = rescale(pixels, self.rescale_factor)
        if self.do_normalize:
            pixels = normalize(pixels, self.image_mean, self.image_std)
        patches, grid_h, grid_w = patchify(pixels, self.patch_size, self.merge_size, self.temporal_patch_size)
        return patches, (1, grid_h, grid_w)

    def __call__(self, images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]) -> dict[str, np.ndarray]:
        """Preprocess a list of images (or one image).

        Returns `{"pixel_values": float32 [sum_i h_i * w_i, patch_dim],
        "image_grid_thw": int64 [num_images, 3]}`, images concatenated in order.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise TypeError(
                f"images must be a PIL image, a uint8 numpy array or a list of them, got {_describe(images)}"
            )
        if len(images) == 0:
            raise ValueError("images is empty: pass at least one image")
        patches_per_image = []
        grids = []
        for image in images:
            patches, grid = self.preprocess_one(image)
            patches_per_image.append(patches)
            grids.append(grid)
        return {
            "pixel_values": np.concatenate(patches_per_image, axis=0),
            "image_grid_thw": np.array(grids, dtype=np.int64),
        }


def image_processor_for_model(model_config: Any, *, min_pixels: int, max_pixels: int) -> ImageProcessor | None:
    """The default image processor of a model's family, for a preset or a checkpoint without preprocessor_config.json.

    `model_config.model_type` picks the normalisation (FAMILY_NORMALIZATION: CLIP's mean / std for "qwen2_5_vl",
    0.5 / 0.5 for "qwen3_vl"); the patch, temporal patch and merge sizes come from `model_config.vision`
    (`patch_size`, `temporal_patch_size`, `spatial_merge_size`), so Qwen3-VL's 16-px patches give a resize factor
    of 32. A text-only model (`vision` None) gets None; a vision model of another family is a ValueError.
    """
    vision = model_config.vision
    if vision is None:
        return None
    model_type = model_config.model_type
    if model_type not in FAMILY_NORMALIZATION:
        raise ValueError(
            f"model_type={model_type!r} has a vision config but no default image processor (known: "
            f"{sorted(FAMILY_NORMALIZATION)}); give the checkpoint a {PREPROCESSOR_CONFIG_NAME}"
        )
    image_mean, image_std = FAMILY_NORMALIZATION[model_type]
    return ImageProcessor(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=image_mean,
        image_std=image_std,
    )
