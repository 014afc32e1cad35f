"""What every command-line entry point shares: errors a user can fix are one line, not a traceback.

`run(main)` replaces `absl.app.run(main)`. A `--config.<path>=value` override that names no key, or an index past a
list's end, is reported naming the argument and the keys that exist; a ConfigError, DataError, a damaged
checkpoint or a held workdir lock is printed as `error: <message>` with exit status 1. `--verbose` shows the full
traceback of those too; an unexpected exception always shows it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of configuration, data and checkpoint errors too.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message says what to fix (printed as one line)."""
    from jaxvlm import checkpoint, configuration, runtime
    from jaxvlm.data.example import ExampleError
    from jaxvlm.models.checkpoint import CheckpointMismatchError

    found = [configuration.ConfigError, ExampleError, CheckpointMismatchError]
    for module, name in ((checkpoint, "CheckpointError"), (runtime, "WorkdirError")):
        if hasattr(module, name):
            found.append(getattr(module, name))
    return tuple(found)


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with one-line errors (see the module docstring)."""

    def main_with_short_errors(argv):
        try:
            return main(argv)
        except user_errors() as error:
            if _VERBOSE.value:
                raise
            raise SystemExit(f"error: {error}") from None

    app.run(main_with_short_errors, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with a bad `--config.<path>` override named instead of a traceback."""
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:  # e.g. `--config.stages.sft.steps=abc`: absl names the flag
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as error:
        if "--verbose" in argv:
            raise
        message = bad_override(argv) or f"{type(error).__name__}: {error}"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_file(argv: Sequence[str]) -> tuple[str, str | None] | None:
    for k, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and k + 1 < len(argv):
            value = argv[k + 1]
        if value is not None:
            path, _, config_arg = value.partition(":")
            return path, config_arg or None
    return None


def bad_override(argv: Sequence[str]) -> str | None:
    """The first `--config.<path>=value` argument whose path does not exist in the config, said plainly."""
    from ml_collections.config_flags import config_path

    located = _config_file(argv)
    if located is None or not os.path.isfile(located[0]):
        return None
    spec = importlib.util.spec_from_file_location("_jaxvlm_cli_config", located[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(located[1]) if located[1] is not None else module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        try:
            config_path.get_value(path, config)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return f"{arg}: {_missing(path, config)}"
    return None


def _missing(path: str, config) -> str:
    """Why `path` names nothing in `config`: the first step that fails, and what exists there."""
    from ml_collections.config_flags import config_path

    parts = path.replace("[", ".[").split(".")
    for k in range(1, len(parts) + 1):
        prefix = ".".join(parts[:k]).replace(".[", "[")
        try:
            config_path.get_value(prefix, config)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            parent = ".".join(parts[: k - 1]).replace(".[", "[")
            value = config_path.get_value(parent, config) if parent else config
            where = f"config.{parent}" if parent else "the config"
            if parts[k - 1].startswith("["):
                return f"{where} has {len(value)} entries; {parts[k - 1]} does not exist"
            keys = sorted(value.keys()) if hasattr(value, "keys") else []
            return f"{where} has no key {parts[k - 1]!r}" + (f" (its keys: {', '.join(keys)})" if keys else "")
    return "cannot be applied"
