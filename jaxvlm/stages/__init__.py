"""Stage modes: one module each, and the registry that maps a stage's `mode` to it.

Adding a mode is one new module (a `base.StageMode` subclass: its keys, checks, and loop-body batch) and one line
here.
"""

from __future__ import annotations

from jaxvlm.stages import dyme, eval, grpo, rejection_sft, sft
from jaxvlm.stages.base import StageMode, StagePlan, plan

MODES: dict[str, StageMode] = {
    "sft": sft.MODE,
    "grpo": grpo.MODE,
    "dyme": dyme.MODE,
    "rejection_sft": rejection_sft.MODE,
    "eval": eval.MODE,
}


def get(mode: str) -> StageMode:
    """The registered mode; ValueError listing the modes otherwise."""
    if mode not in MODES:
        raise ValueError(f"stage mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode]


__all__ = ["MODES", "StageMode", "StagePlan", "get", "plan"]
