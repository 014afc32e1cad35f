"""Step-throughput benchmarks, jaxvlm next to the PyTorch baseline on the same model and batches.

    python -m jaxvlm.bench --config configs/bench.py:100m --workdir /tmp/jaxvlm-bench

Variants (random weights, no downloads):
  tiny   the `tiny` preset (0.2M params), float32: a smoke run of every section in about a minute on a CPU
  100m   the `100m` preset (118M params, 18M of them vision), float32: the CPU comparison (BENCHMARKS.md)
  0.5b   `qwen2_5_vl_0_5b` (Qwen2.5-0.5B decoder + the family's ViT, 1.16B params), bfloat16: GPU
  3b     `qwen2_5_vl_3b` (Qwen2.5-VL-3B shapes, 3.75B params), bfloat16, sequence 2048: GPU (the MFU target)
  qwen3_vl_tiny  the `qwen3_vl_tiny` preset (0.3M params), float32: the Qwen3-VL smoke run
  qwen3_vl_100m  `qwen3_vl_100m` (the `100m` widths in the Qwen3-VL architecture, 129M params, 29M of them vision),
                 float32: the Qwen3-VL CPU comparison, at the `100m` variant's sizes
  qwen3_vl_2b    `qwen3_vl_2b` (Qwen3-VL-2B shapes, 2.13B params), bfloat16, the `3b` variant's shapes: GPU
  qwen3_vl_4b    `qwen3_vl_4b` (Qwen3-VL-4B shapes, 4.44B params), bfloat16, the `3b` variant's shapes: GPU
Qwen3-VL's patches are 16 px (a 2 x 2 merge unit: image sides a multiple of 32 px), Qwen2.5-VL's 14 px (28 px). The
Qwen3-VL variants take the images whose patch grid equals their Qwen2.5-VL counterpart's (64 / 128 / 256 / 512 px
for 56 / 112 / 224 / 448 px), so both families' rows hold the same image patches and placeholder tokens.
Every field can be overridden, e.g. `--config.sections=sft,decode --config.torch.compile=False`.
`--config.model.lora.rank=16` (alpha, dropout, targets as `config.model.lora` of a training config) runs the SFT and
GRPO sections with LoRA adapters: jaxvlm trains its adapters, the PyTorch side the same adapters through peft.

`sft.steps`, `grpo.steps` and `decode.repeats` count each side's timed repeats. They run after every side's
compile / warm-up, interleaved round by round with the other sides' repeats, and the table reports their median
(and min-max). The counts are odd, so the median is one of the repeats. They are larger where a repeat is cheap.
"""

from __future__ import annotations

import ml_collections

from jaxvlm.configuration import check_variant, lora_section

VARIANTS = ("tiny", "100m", "0.5b", "3b", "qwen3_vl_tiny", "qwen3_vl_100m", "qwen3_vl_2b", "qwen3_vl_4b")
# The Qwen3-VL variants: their Qwen2.5-VL counterpart (whose sizes they take) and remat.
QWEN3_VL = {
    "qwen3_vl_tiny": ("tiny", "none"),
    "qwen3_vl_100m": ("100m", "none"),
    "qwen3_vl_2b": ("3b", "dots"),
    "qwen3_vl_4b": ("3b", "full"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = check_variant(arg or "tiny", VARIANTS, "configs/bench.py")
    if variant in QWEN3_VL:
        return _qwen3_vl(variant)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.sections = ("sft", "grpo", "decode")
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            path="",
            dtype="float32",
            param_dtype="float32",
            remat="none",
            attention="auto",
            logits_chunk=512,
            vocab_chunk=32768,
            # LoRA (rank 0 = off): e.g. --config.model.lora.rank=16 trains adapters on the decoder's projections
            # (configuration.lora_section's targets) on both sides: jaxvlm's adapters, and the same adapters through
            # peft on the PyTorch side.
            lora=lora_section(),
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))  # (data, fsdp, tensor); -1 = the other devices
    # AdamW, constant lr; weight decay 0 so both sides' decay masks cannot differ (it costs the same either way).
    c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0))
    # SFT: rows of seq_len tokens = one image (image_hw pixels; None = text only) + prompt + completion_len scored.
    c.sft = ml_collections.ConfigDict(
        dict(batch_size=8, micro_batches=1, seq_len=128, completion_len=32, image_hw=(56, 56), steps=21)
    )
    # GRPO: prompts of prompt_len tokens (one image each), G rollouts of exactly max_new_tokens (no stop token).
    c.grpo = ml_collections.ConfigDict(
        dict(
            prompts=4, num_generations=4, prompt_len=64, max_new_tokens=16, micro_batches=1, image_hw=(56, 56), steps=11
        )
    )
    c.decode = ml_collections.ConfigDict(dict(batches=(1, 16, 64), prompt_len=32, new_tokens=32, repeats=11))
    c.torch = ml_collections.ConfigDict(dict(enabled=True, compile=True))
    c.peak = ml_collections.ConfigDict(dict(matmul_size=4096))  # CPU: the measured-matmul peak's size
    if variant == "100m":
        c.model.preset = "100m"
        # ~35 s per SFT round of the three sides and ~20 s per GRPO round on 2 cores: 5 rounds each.
        c.sft.update(batch_size=4, seq_len=512, completion_len=128, image_hw=(224, 224), steps=5)
        c.grpo.update(prompts=2, num_generations=4, prompt_len=128, max_new_tokens=32, image_hw=(112, 112), steps=5)
        c.decode.update(prompt_len=64, new_tokens=32, repeats=5)
    elif variant in ("0.5b", "3b"):
        c.model.update(
            preset="qwen2_5_vl_0_5b" if variant == "0.5b" else "qwen2_5_vl_3b",
            dtype="bfloat16",
            remat="dots" if variant == "0.5b" else "full",
        )
        # One micro-batch of 8 rows: 8 data-parallel devices (a v5p:2x2x2 slice, `python -m jaxvlm.bench.memory`)
        # split it one row each; 4-row micro-batches could not be split.
        c.sft.update(batch_size=8, micro_batches=1, seq_len=2048, completion_len=512, image_hw=(448, 448), steps=11)
        c.grpo.update(
            prompts=16,
            num_generations=8,
            prompt_len=512,
            max_new_tokens=256,
            micro_batches=8,
            image_hw=(448, 448),
            steps=5,
        )
        c.decode.update(prompt_len=512, new_tokens=128, repeats=5)
    return c


def _qwen3_image(hw) -> tuple[int, int]:
    """The Qwen3-VL image (16 px patches) with the patch grid of a Qwen2.5-VL image (14 px patches)."""
    return tuple(side // 14 * 16 for side in hw)


def _qwen3_vl(variant: str) -> ml_collections.ConfigDict:
    """A Qwen3-VL variant: its Qwen2.5-VL counterpart's config with the Qwen3-VL preset, dtype and remat, and the
    images of the same patch grid."""
    counterpart, remat = QWEN3_VL[variant]
    c = get_config(counterpart)
    c.model.update(preset=variant, remat=remat)
    c.sft.image_hw = _qwen3_image(c.sft.image_hw)
    c.grpo.image_hw = _qwen3_image(c.grpo.image_hw)
    return c
