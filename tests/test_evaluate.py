"""`python -m jaxvlm.evaluate`: eval stages on gym and JSONL sources, any saved checkpoint, greedy or pass@k,
per-task / per-difficulty accuracy, the completions file and summary, rows split over the mesh, bad records
raised (file:line) or skipped and counted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxvlm import models, trainer
from jaxvlm.data import sources
from jaxvlm.data.export import write_jsonl_dataset
from jaxvlm.data.jsonl import DataError
from jaxvlm.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_config(variant: str = ""):
    spec = importlib.util.spec_from_file_location("eval_config", os.path.join(ROOT, "configs", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_the_command_samples_k_per_example_and_reports_pass_at_k(tmp_path):
    workdir = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvlm.evaluate", "--config", "configs/eval.py:tiny", "--workdir", str(workdir)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "eval" / "eval" / "summary.json") as f:
        summary = json.load(f)
    rows = read_rows(str(workdir / "eval" / "eval" / "completions.jsonl"))
    m = summary["metrics"]
    assert summary["num_generations"] == 4 and m["examples"] == 8 and len(rows) == 32
    assert [row["sample"] for row in rows] == [0, 1, 2, 3] * 8 and len({row["id"] for row in rows}) == 8
    scores = np.asarray([row["score"] for row in rows])
    assert m["accuracy"] == pytest.approx(scores.mean())
    assert m["pass@4"] == pytest.approx(scores.reshape(8, 4).max(-1).mean())
    for task in ("exists", "count"):
        assert m[f"accuracy/task/{task}"] == pytest.approx(np.mean([r["score"] for r in rows if r["task"] == task]))
    assert "[eval] preset:tiny: 8 examples" in proc.stdout and "pass@4" in proc.stdout


def test_a_training_config_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvlm.evaluate", "--config", "configs/grpo.py:tiny", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "config.stages.grpo is a 'grpo' stage (train with python -m jaxvlm.main)" in proc.stderr


@pytest.fixture(scope="module")
def checkpoint_and_set(tmp_path_factory):
    """A saved tiny checkpoint (as a run's final_model/ is) and a JSONL set of 9 gym examples and one bad line."""
    from jaxvlm import configuration, runtime

    root = tmp_path_factory.mktemp("evaluate")
    spec = configuration.resolve_model(configuration.base_config().model)
    tokenizer = runtime.build_tokenizer(spec, str(root))
    model, params = runtime.build_model(spec, 0, tokenizer)
    checkpoint = str(root / "model")
    models.save_pretrained(model, params, checkpoint)
    tokenizer.save_pretrained(checkpoint)
    runtime.build_image_processor(spec, model.config).save_pretrained(checkpoint)
    gym = sources.make_source({"kind": "gym", "split": "test", "num_examples": 9, "tasks": ("exists", "count")})
    path = write_jsonl_dataset([gym[i] for i in range(9)], root / "set", name="test.jsonl")
    with open(path) as f:
        lines = f.readlines()
    lines.insert(4, '{"question": "no answer here"}\n')  # line 5: a bad record (one after the last good record
    with open(path, "w") as f:  # would not be counted yet: the pipeline counts skips with the next batch)
        f.writelines(lines)
    return checkpoint, path


def jsonl_config(checkpoint: str, path: str, mesh_shape, on_error: str = "skip"):
    c = eval_config()
    c.model.update(path=checkpoint, dtype="float32", param_dtype="float32", max_pixels=56 * 56)
    c.mesh.shape = mesh_shape
    c.stages.eval.data.sources[0]["path"] = path
    c.stages.eval.data.update(batch_size=4, max_prompt_length=256, on_error=on_error)
    c.stages.eval.sampling.max_new_tokens = 12
    return c


@pytest.mark.slow
def test_a_saved_checkpoint_on_a_jsonl_set_on_a_mesh_equals_one_device(checkpoint_and_set, tmp_path):
    """Every example is scored (batches of 4, 4 and a last one of 1, which cannot split over 2 devices and runs on
    one), the bad record is skipped and counted, and greedy completions on a (1, 2, 1) mesh equal one device's."""
    checkpoint, path = checkpoint_and_set
    outputs = {}
    for shape in ((1, 2, 1), (1, 1, 1)):
        workdir = str(tmp_path / f"mesh{shape[1]}")
        result = trainer.run(jsonl_config(checkpoint, path, shape), workdir)
        assert result["finished"] and not os.path.exists(os.path.join(workdir, "final_model"))  # nothing trained
        with open(os.path.join(workdir, "eval", "eval", "summary.json")) as f:
            outputs[shape] = json.load(f), read_rows(os.path.join(workdir, "eval", "eval", "completions.jsonl"))
        logged = [r for r in read_metrics(workdir) if "eval/accuracy" in r]
        assert len(logged) == 1 and logged[0]["eval/data/skipped"] == 1
    (summary, rows), (_, single) = outputs[(1, 2, 1)], outputs[(1, 1, 1)]
    assert summary["metrics"]["examples"] == 9 and len(rows) == 9
    assert summary["metrics"]["data/skipped"] == 1 and summary["model"] == checkpoint
    assert [r["completion"] for r in rows] == [r["completion"] for r in single]
    assert summary["metrics"]["accuracy"] == pytest.approx(np.mean([r["score"] for r in rows]))


def test_a_bad_record_stops_the_evaluation_naming_file_and_line(checkpoint_and_set, tmp_path):
    checkpoint, path = checkpoint_and_set
    with pytest.raises(DataError, match=rf"{path}:5"):
        trainer.run(jsonl_config(checkpoint, path, (1, 1, 1), on_error="raise"), str(tmp_path))
