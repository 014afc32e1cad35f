"""Command-line entry point: `python -m jaxvlm.main --config configs/<recipe>.py --workdir DIR`.

Config files follow big_vision: a Python file with `get_config(arg)` returning an `ml_collections.ConfigDict`;
`--config configs/x.py:arg` passes `arg`, and `--config.a.b=value` overrides any field. A config error (a value
that cannot work, a derived key set to another value, a missing file) stops the run at start-up with one line naming
the key, before the model is built; `--verbose` adds the traceback (`jaxvlm.cli`).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxvlm import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from jaxvlm import distributed, trainer

    distributed.initialize()  # multi-process runs (launch/); a no-op for a single process
    config = _CONFIG.value
    if "stages" not in config:
        raise app.UsageError(
            "this config has no stages to train (configs/forward.py is run by `python -m jaxvlm.bench.forward`)"
        )
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required for training (checkpoints, metrics, resume)")
    try:
        result = trainer.run(config, _WORKDIR.value)
    except trainer.TrainingDiverged as error:
        raise SystemExit(f"training stopped: {error}") from None
    if not result["finished"]:
        print(f"stopped by a signal; checkpoint written. Re-run the same command to resume ({_WORKDIR.value})")
    elif jax.process_index() == 0:
        from jaxvlm import report

        print(report.report(_WORKDIR.value))


if __name__ == "__main__":
    cli.run(main)
