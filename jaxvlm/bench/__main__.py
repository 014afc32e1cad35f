"""`python -m jaxvlm.bench --config configs/bench.py[:variant] --workdir DIR`: see `jaxvlm.bench.run`."""

from absl import app, flags
from ml_collections import config_flags

from jaxvlm.bench import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/bench.py", "Path to a benchmark config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxvlm-bench", "Where bench.json is written.")


def main(argv):
    del argv
    results = run.run(_CONFIG.value, _WORKDIR.value)
    print(run.table(results), flush=True)
    print(f"\nwrote {_WORKDIR.value}/bench.json")


if __name__ == "__main__":
    app.run(main)
