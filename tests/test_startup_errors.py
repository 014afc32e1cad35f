"""A careless command fails at start-up, before the model or tokenizer is built, with one line naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxvlm import configuration, runtime, trainer
from test_config_keys import load_module, with_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
    return load_module("demo").get_config(None)


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Fails the test if the run gets as far as building the tokenizer or the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model / tokenizer was built before the config error")

    monkeypatch.setattr(runtime, "setup", refuse)
    monkeypatch.setattr(runtime, "build_model", refuse)
    monkeypatch.setattr(runtime, "build_tokenizer", refuse)


# What a careless user set, and the key the error must name.
CARELESS = [
    (("stages", "sft", "optimizer", "learning_rate"), -1.0, "must be >= 0"),
    (("stages", "sft", "optimizer", "warmup_steps"), -5, "must be >= 0"),
    (("stages", "sft", "optimizer", "eps"), 0.0, "must be > 0"),
    (("stages", "sft", "optimizer", "b1"), 1.0, r"must be in \[0, 1\)"),
    (("train", "log_every"), 0, "must be >= 1"),
    (("train", "keep_checkpoints"), 0, "must be >= 1"),
    (("eval", "batch_size"), 0, "must be >= 1"),
    (("stages", "dyme", "sampling", "max_new_tokens"), 0, "must be >= 1"),
    (("eval", "sampling", "max_new_tokens"), 0, "must be >= 1"),
    (("stages", "dyme", "sampling", "top_p"), 0.0, r"must be in \(0, 1\]"),
    (("stages", "sft", "data", "batch_size"), 2**31, r"must be <= 2147483647 \(2\*\*31 - 1\)"),
    (("stages", "sft", "data", "max_prompt_length"), 0, "must be >= 1"),
    (("seed",), -1, "must be >= 0"),
    (("stages", "dyme", "loss", "eps_high"), float("nan"), "must be a finite number"),
    (("model", "vocab_chunk"), 0, "must be >= 1"),
    (("model", "remat"), "sometimes", "must be one of"),
]


@pytest.mark.parametrize("path,value,message", CARELESS, ids=[".".join(c[0]) for c in CARELESS])
def test_a_bad_value_stops_the_run_before_the_model_naming_its_key(path, value, message, tmp_path, nothing_heavy):
    config = with_value(demo_config(), path, value)
    with pytest.raises(configuration.ConfigError, match=rf"^config\.{'[.]'.join(path)}: {message}"):
        trainer.run(config, str(tmp_path))


def test_a_missing_checkpoint_directory_is_not_found_without_the_hub(tmp_path, nothing_heavy):
    config = demo_config()
    config.model.preset, config.model.path = "", str(tmp_path / "nonexistent")
    with pytest.raises(configuration.ConfigError, match=r"^config\.model\.path: .*nonexistent: not found"):
        trainer.run(config, str(tmp_path / "work"))
    (tmp_path / "empty").mkdir()
    config.model.path = str(tmp_path / "empty")
    with pytest.raises(configuration.ConfigError, match=r"no config\.json"):
        trainer.run(config, str(tmp_path / "work"))


def test_a_missing_jsonl_file_is_named_by_its_source_key(tmp_path, nothing_heavy):
    config = demo_config()
    config.stages.sft.data.sources = [{"kind": "jsonl", "path": str(tmp_path / "train.jsonl")}]
    with pytest.raises(configuration.ConfigError, match=r"^config\.stages\.sft\.data\.sources\[0\]\.path: .*not found"):
        trainer.run(config, str(tmp_path / "work"))


def test_a_bad_source_entry_is_named_by_its_key(tmp_path, nothing_heavy):
    config = demo_config()
    config.stages.sft.data.sources = [{"kind": "gym", "split": "train", "num_examples": 8, "image_sise": 56}]
    with pytest.raises(configuration.ConfigError, match=r"^config\.stages\.sft\.data\.sources\[0\]\.image_sise: not a"):
        trainer.run(config, str(tmp_path))


def test_the_mesh_and_the_batch_are_checked_against_the_devices():
    config = demo_config()
    config.mesh.shape = (1, 4, 1)
    spec = configuration.resolve(config)
    with pytest.raises(configuration.ConfigError, match=r"^config\.mesh\.shape: .*needs 4 devices; 1 are"):
        configuration.check_devices(spec, num_devices=1)
    config.stages.sft.data.batch_size = 6  # 6 rows over 4 data-parallel devices
    with pytest.raises(configuration.ConfigError, match=r"^config\.stages\.sft\.data\.batch_size: 6 rows cannot"):
        configuration.check_devices(configuration.resolve(config), num_devices=4)
    config.mesh.shape = (2, -1, 1)
    with pytest.raises(configuration.ConfigError, match=r"^config\.mesh\.shape: .*3 devices cannot fill it"):
        configuration.check_devices(configuration.resolve(config), num_devices=3)


def run_main(*args: str, workdir) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxvlm.main", "--config", "configs/demo.py", "--workdir", str(workdir), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_command_line_prints_a_config_error_as_one_line(tmp_path):
    result = run_main("--config.train.log_every=0", workdir=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: config.train.log_every: must be >= 1, got 0"]
    verbose = run_main("--config.train.log_every=0", "--verbose", workdir=tmp_path)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "config.train.log_every" in verbose.stderr


def test_the_command_line_names_an_override_that_fits_no_key(tmp_path):
    result = run_main("--config.stages.sft.data.sources[5].split=train", workdir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --config.stages.sft.data.sources[5].split=train: config.stages.sft.data.sources has 1 entries; "
        "[5] does not exist"
    ]
    result = run_main("--config.stages.sft.optimizer.lr=3", workdir=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --config.stages.sft.optimizer.lr=3: config.stages.sft.optimizer has no key 'lr'")
    assert "learning_rate" in line
    result = run_main("--config.stages.sft.steps=abc", workdir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: flag --config.stages.sft.steps=abc: invalid literal for int() with base 10: 'abc'"
    ]


def test_the_command_line_prints_a_data_error_as_one_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a", "bbox": 5}) + "\n")
    config_file = tmp_path / "bad_data.py"
    config_file.write_text(
        "import importlib.util\n"
        "def get_config():\n"
        f"    spec = importlib.util.spec_from_file_location('demo', {os.path.join(ROOT, 'configs', 'demo.py')!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    c = module.get_config(None)\n"
        f"    c.stages.sft.data.sources = [{{'kind': 'jsonl', 'path': {str(data)!r}}}]\n"
        "    c.stage_order = ('sft',)\n"
        "    return c\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxvlm.main", "--config", str(config_file), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data: ") and f"{data}:1: field 'bbox'" in last, result.stderr  # on_error=skip
    assert "Traceback" not in result.stderr


def test_a_frozen_pattern_that_matches_no_parameter_fails_before_the_model_is_built(tmp_path, nothing_heavy):
    config = demo_config()
    config.stages.sft.optimizer.frozen = ("^vision_tower/",)  # another model's name for the vision tower
    with pytest.raises(configuration.ConfigError, match=r"^config\.stages\.sft\.optimizer\.frozen: '\^vision_tower/'"):
        trainer.run(config, str(tmp_path))
    config.stages.sft.optimizer.frozen = ("^visual/", "(unclosed")
    with pytest.raises(
        configuration.ConfigError, match=r"^config\.stages\.sft\.optimizer\.frozen: '\(unclosed' is not"
    ):
        trainer.run(config, str(tmp_path))
