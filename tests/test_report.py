"""jaxvlm.report: the evaluation table after each stage and the PNG curves, from metrics records."""

import os

from jaxvlm import configuration, report
from jaxvlm.metrics import MetricsWriter, read_metrics


def _write_run(workdir):
    """A two-stage run's records as the trainer writes them (train/ every step, eval/ at each stage end)."""
    with MetricsWriter(str(workdir), tensorboard=False) as w:
        for step in range(1, 5):
            w.write(step, {"loss": 2.0 / step, "stage": "sft", "stage_step": step}, prefix="train/")
        w.write(
            4,
            {"accuracy": 0.5, "accuracy/task/count": 0.25, "accuracy/task/exists": 0.75, "examples": 8, "stage": "sft"},
            prefix="eval/",
        )
        for step in range(5, 9):
            w.write(
                step,
                {"loss": 0.1, "reward": step / 10, "accuracy": step / 20, "stage": "dyme", "stage_step": step - 4},
                prefix="train/",
            )
        w.write(
            6,
            {"accuracy": 0.55, "accuracy/task/count": 0.3, "accuracy/task/exists": 0.8, "examples": 8, "stage": "dyme"},
            prefix="eval/",
        )  # a mid-stage evaluation: not the stage's result
        w.write(
            8,
            {
                "accuracy": 0.625,
                "accuracy/task/count": 0.5,
                "accuracy/task/exists": 0.75,
                "examples": 8,
                "stage": "dyme",
            },
            prefix="eval/",
        )


def test_table_has_each_stage_final_accuracy_per_task_and_the_change(tmp_path):
    _write_run(tmp_path)
    evals = report.stage_evaluations(read_metrics(str(tmp_path)))
    assert [(s, step) for s, step, _ in evals] == [("sft", 4), ("dyme", 8)]
    lines = report.eval_table(read_metrics(str(tmp_path))).splitlines()
    assert lines[0] == "Held-out accuracy (greedy, 8 examples):"
    assert lines[1].split() == [
        "task",
        "after",
        "sft",
        "(step",
        "4)",
        "after",
        "dyme",
        "(step",
        "8)",
        "change",
        "in",
        "dyme",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows == {
        "count": ["0.250", "0.500", "+0.250"],
        "exists": ["0.750", "0.750", "+0.000"],
        "all": ["0.500", "0.625", "+0.125"],
    }


def test_table_shows_reasoning_f1_when_the_evaluations_measured_it(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write(
            4,
            {"accuracy": 0.5, "accuracy/task/count": 0.5, "think_f1": 0.25, "examples": 8, "stage": "sft"},
            prefix="eval/",
        )
        w.write(
            8,
            {"accuracy": 0.75, "accuracy/task/count": 0.75, "think_f1": 0.625, "examples": 8, "stage": "dyme"},
            prefix="eval/",
        )
    rows = {
        line.rsplit(None, 3)[0]: line.split()[-3:]
        for line in report.eval_table(read_metrics(str(tmp_path))).splitlines()[3:]
    }
    assert rows["reasoning F1"] == ["0.250", "0.625", "+0.375"]
    assert rows["all"] == ["0.500", "0.750", "+0.250"]
    assert "Greedy completions" not in report.report(str(tmp_path))
    os.makedirs(tmp_path / "eval_completions")
    (tmp_path / "eval_completions" / "sft-step000004.jsonl").write_text("{}\n")
    assert f"Greedy completions of every evaluation: {tmp_path}/eval_completions/" in report.report(str(tmp_path))


def test_report_writes_pngs_and_a_run_without_eval_says_so(tmp_path):
    _write_run(tmp_path / "a")
    text = report.report(str(tmp_path / "a"))
    assert "after dyme" in text
    for name in ("reward.png", "accuracy.png"):
        with open(tmp_path / "a" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with MetricsWriter(str(tmp_path / "b"), tensorboard=False) as w:
        w.write(1, {"loss": 1.0, "stage": "sft"}, prefix="train/")
    assert report.eval_table(read_metrics(str(tmp_path / "b"))) == ""
    assert report.report(str(tmp_path / "b")).startswith("No evaluation in this run.")
    assert os.path.isfile(tmp_path / "b" / "accuracy.png")


def test_demo_config_is_valid_and_trains_sft_then_dyme():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import demo

    for variant in demo.VARIANTS:
        c = demo.get_config(variant)
        configuration.check_config(c)
        assert c.stage_order == ("sft", "dyme") and c.model.preset and not c.model.path
        assert c.stages.dyme.loss.beta == 0.0  # DyME trains without a KL term
        assert {s["split"] for s in c.eval.sources} == {"validation"}
        assert {s["split"] for st in c.stage_order for s in c.stages[st].data.sources} == {"train"}
