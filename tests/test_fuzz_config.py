"""Careless config overrides: every value is checked at start-up, under its full key path.

A seeded generator sets one leaf of a recipe config (every recipe and variant) to a hostile value: negative, zero,
huge, NaN, infinite, a wrong type, an empty or odd string, a broken source list. Each case must end in one of three
ways, all before anything heavy is built: ml_collections refuses the type (as `--config.x=...` does), `resolve` +
the file and device checks raise a ConfigError that names a `config.` key path, or the value is accepted. Anything
else (a TypeError, KeyError, IndexError, ZeroDivisionError ... from inside) fails the test.

`JAXVLM_FULL_TESTS=1` runs 1,500 cases; the default runs 150.
"""

from __future__ import annotations

import collections
import math
import os
import random
import re
import time

import ml_collections
import pytest

from jaxvlm import configuration
from test_config_keys import leaves, recipe_configs, runnable, with_value

FULL = os.environ.get("JAXVLM_FULL_TESTS") == "1"
CASES = 1500 if FULL else 150

HOSTILE = {
    int: [-1, 0, -(10**9), 10**18, 2**31, 1, 3],
    float: [-1.0, 0.0, math.nan, math.inf, -math.inf, 1e30, 1e-30, 1.5, -0.0],
    str: ["", "x", "bogus", "../../nonexistent", "\x00", "   ", "é" * 3, "/nonexistent/dir"],
    bool: [True, False],
    "list": [
        (),
        (0,),
        (-1, -1, -1),
        (1, 0, 1),
        ("x",),
        ({"kind": "bogus"},),
        ({"kind": "gym", "num_examples": -1},),
        ({"kind": "gym", "num_examples": 2.5},),
        ({"kind": "gym", "split": "nope", "num_examples": 4},),
        ({"kind": "gym", "num_examples": 4, "image_size": 30},),
        ({"kind": "jsonl", "path": "/nonexistent.jsonl"},),
        ({"kind": "jsonl", "path": 5},),
        ({"kind": "tfds"},),
        ({"name": "accuracy", "weight": math.nan},),
        ({"name": "nope"},),
        ("not a dict",),
        ("^(unclosed",),
    ],
    "wrong_type": [2.5, True, "3", None, [1], {"a": 1}],
}


def hostile_value(rng: random.Random, value, field_type):
    if rng.random() < 0.15:
        return rng.choice(HOSTILE["wrong_type"])
    if isinstance(value, (list, tuple)):
        return rng.choice(HOSTILE["list"])
    kind = field_type if field_type in (int, float, str, bool) else type(value)
    if kind is type(None):
        kind = int
    return rng.choice(HOSTILE.get(kind, HOSTILE["wrong_type"]))


def check_at_startup(config: ml_collections.ConfigDict) -> None:
    spec = configuration.resolve(config)
    configuration.check_files(spec)
    configuration.check_devices(spec, num_devices=1)


def run_case(config, path, value) -> str:
    """ "type" (refused on assignment), "config_error" or "accepted"; any other exception propagates."""
    try:
        c = with_value(config, path, value)
    except (TypeError, ValueError, KeyError):  # ml_collections' type safety: the command line refuses it too
        return "type"
    try:
        check_at_startup(c)
    except configuration.ConfigError as error:
        assert str(error).startswith("config."), f"{'.'.join(path)}={value!r}: {error}"
        assert "\n" not in str(error), f"{'.'.join(path)}={value!r}: a one-line error, got {error}"
        return "config_error"
    return "accepted"


def test_hostile_overrides_fail_at_startup_naming_the_key():
    rng = random.Random(18)
    configs = [(p.values[0], p.values[1]) for p in recipe_configs()]
    base = {c: runnable(*c) for c in configs}
    for c in base.values():  # the full-size recipes' placeholder paths would fail check_files in every case
        c.model.path, c.model.preset = "", "tiny"
    outcomes, crashes, slowest = collections.Counter(), [], (0.0, "")
    for _ in range(CASES):
        config = base[rng.choice(configs)]
        path, value, field_type = rng.choice(list(leaves(config)))
        if path == ("model", "preset"):
            continue  # "" with no path is tested below
        bad = hostile_value(rng, value, field_type)
        start = time.perf_counter()
        try:
            outcomes[run_case(config, path, bad)] += 1
        except Exception as error:  # noqa: BLE001 - every crash is listed below
            crashes.append(f"config.{'.'.join(path)}={bad!r}: {type(error).__name__}: {error}")
        slowest = max(slowest, (time.perf_counter() - start, f"config.{'.'.join(path)}={bad!r}"))
    assert not crashes, "\n".join(crashes)
    assert outcomes["config_error"] > CASES // 4, outcomes
    print(f"config fuzz: {sum(outcomes.values())} cases, {dict(outcomes)}; slowest {slowest[0]:.3f} s: {slowest[1]}")


# The numeric keys where a negative value has a meaning (everything else must reject -1 by name).
NEGATIVE_OK = {"min_reward"}


@pytest.mark.parametrize("name,variant", list(recipe_configs()))
def test_every_numeric_key_rejects_a_negative_value_by_name(name, variant):
    config = runnable(name, variant)
    config.model.path, config.model.preset = "", "tiny"
    for path, value, field_type in leaves(config):
        numeric = field_type in (int, float) and not isinstance(value, bool)
        if not numeric or path[-1] in NEGATIVE_OK:
            continue
        key = re.escape("config." + ".".join(path))
        with pytest.raises(configuration.ConfigError, match=rf"^{key}: "):
            check_at_startup(with_value(config, path, field_type(-1)))
