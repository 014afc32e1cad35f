"""Score a model: `python -m jaxvlm.evaluate --config configs/eval.py --config.model.path=DIR --workdir W`.

The model is any Hugging Face checkpoint directory jaxvlm reads (Qwen2.5-VL, Qwen2 / Qwen2.5), e.g. a run's
`final_model/`. The config's stages are all eval stages (`jaxvlm.stages.eval`): gym, JSONL or tfds sources, greedy or
sampled (`sampling.num_generations = k`: pass@k), rows sharded over the mesh as in training. Each stage writes
`W/eval/<stage>/completions.jsonl` (one line per sample: question, reference, completion, score) and `summary.json`
(accuracy overall, per task and per difficulty); a bad record raises naming file:line, or with
`data.on_error="skip"` is skipped and counted (`data/skipped`). The table printed at the end is the summaries'.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxvlm import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/eval.py", "Path to an evaluation config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where completions, summaries and metrics are written.")


def summary_table(workdir: str, stage_names) -> str:
    """Accuracy (and pass@k) overall and per task, one block per eval stage, from the summaries."""
    lines = []
    for name in stage_names:
        with open(os.path.join(workdir, "eval", name, "summary.json")) as f:
            summary = json.load(f)
        m = summary["metrics"]
        head = f"[{name}] {summary['model']}: {int(m['examples'])} examples, accuracy {m['accuracy']:.4f}"
        k = summary["num_generations"]
        if k > 1:
            head += f", pass@{k} {m[f'pass@{k}']:.4f}"
        lines.append(head)
        for key in sorted(m):
            if key.startswith("accuracy/"):
                lines.append(f"    {key[len('accuracy/') :]:<32} {m[key]:.4f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from jaxvlm import distributed, trainer

    distributed.initialize()
    config = _CONFIG.value
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (completions, summaries, metrics)")
    training = [n for n in config.get("stage_order", ()) if config.stages[n].mode != "eval"]
    if training:
        raise app.UsageError(
            f"jaxvlm.evaluate runs eval stages only; config.stages.{training[0]} is a "
            f"{config.stages[training[0]].mode!r} stage (train with python -m jaxvlm.main)"
        )
    trainer.run(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(summary_table(_WORKDIR.value, config.stage_order))


if __name__ == "__main__":
    cli.run(main)
