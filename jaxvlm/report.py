"""What a finished run learned, from its `metrics.jsonl`: the evaluation table and the reward / accuracy curves.

    records = metrics.read_metrics(workdir)
    print(eval_table(records))          # held-out accuracy per task after each stage
    plot_curves(records, workdir)       # reward.png, accuracy.png

`python -m jaxvlm.main` prints the table and writes the plots at the end of every training run; run this module
(`python -m jaxvlm.report WORKDIR`) to redo that for an existing workdir.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from jaxvlm.metrics import read_metrics

TASK_PREFIX = "eval/accuracy/task/"


def stage_evaluations(records: Sequence[dict]) -> list[tuple[str, int, dict]]:
    """The last evaluation of each stage, in run order: [(stage, global step, {metric: value})].

    The trainer evaluates at every stage's end, so this is the held-out result "after" each stage.
    """
    last: dict[str, tuple[int, dict]] = {}
    order: list[str] = []
    for r in records:
        if "eval/accuracy" not in r:
            continue
        stage = str(r.get("eval/stage", ""))
        if stage not in last:
            order.append(stage)
        last[stage] = (int(r["step"]), r)
    return [(s, last[s][0], last[s][1]) for s in order]


def eval_table(records: Sequence[dict]) -> str:
    """A text table: held-out accuracy per task (rows) after each stage (columns), and the change over the last stage.

    Empty string when the run has no evaluation.
    """
    evals = stage_evaluations(records)
    if not evals:
        return ""
    tasks = sorted({k[len(TASK_PREFIX) :] for _, _, r in evals for k in r if k.startswith(TASK_PREFIX)})
    headers = ["task"] + [f"after {s} (step {step})" for s, step, _ in evals]
    if len(evals) > 1:
        headers.append(f"change in {evals[-1][0]}")
    keys = [(task, TASK_PREFIX + task) for task in tasks] + [("all", "eval/accuracy")]
    # The reasoning's word overlap with the references (the trainer's eval/think_f1, DyME's thinking reward).
    if any("eval/think_f1" in r for _, _, r in evals):
        keys.append(("reasoning F1", "eval/think_f1"))
    rows = []
    for label, key in keys:
        values = [r.get(key) for _, _, r in evals]
        row = [label] + ["-" if v is None else f"{v:.3f}" for v in values]
        if len(evals) > 1:
            a, b = values[-2], values[-1]
            row.append("-" if a is None or b is None else f"{b - a:+.3f}")
        rows.append(row)
    n = evals[-1][2].get("eval/examples")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [
        f"Held-out accuracy (greedy{'' if n is None else f', {int(n)} examples'}):",
        line(headers),
        line(["-" * w for w in widths]),
    ]
    out += [line(row) for row in rows]
    return "\n".join(out)


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _stage_bounds(records: Sequence[dict]) -> list[tuple[str, int, int]]:
    """[(stage, first step, last step)] of the training records."""
    bounds: dict[str, list[int]] = {}
    for r in records:
        stage = r.get("train/stage")
        if stage is not None:
            b = bounds.setdefault(str(stage), [int(r["step"]), int(r["step"])])
            b[1] = int(r["step"])
    return [(s, lo, hi) for s, (lo, hi) in bounds.items()]


def plot_curves(records: Sequence[dict], out_dir: str) -> list[str]:
    """Write `reward.png` (training reward and rollout accuracy of RL stages, SFT loss) and `accuracy.png`
    (held-out accuracy, overall and per task) into `out_dir`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounds = _stage_bounds(records)

    def mark_stages(ax):
        for i, (stage, lo, hi) in enumerate(bounds):
            if i:
                ax.axvline(lo - 0.5, color="0.6", linestyle=":", linewidth=1)
            ax.text(
                (lo + hi) / 2,
                1.0,
                stage,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.3",
            )

    paths = []
    os.makedirs(out_dir, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("train/reward", "reward (mean over rollouts)"), ("train/accuracy", "accuracy of the rollouts")):
        xs, ys = _series(records, key)
        if xs:
            ax1.plot(xs, ys, label=label, linewidth=1)
    ax1.set_ylabel("RL stages")
    if ax1.lines:
        ax1.legend(fontsize=8)
    pts = [
        (int(r["step"]), float(r["train/loss"]))
        for r in records  # SFT stages: RL losses are surrogates
        if isinstance(r.get("train/loss"), (int, float)) and "train/reward" not in r
    ]
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1, color="C2")
    ax2.set_ylabel("SFT loss (token NLL)")
    ax2.set_xlabel("step")
    mark_stages(ax1)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "reward.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    xs, ys = _series(records, "eval/accuracy")
    ax.plot(xs, ys, marker="o", linewidth=2, color="black", label="all tasks")
    tasks = sorted({k[len(TASK_PREFIX) :] for r in records for k in r if k.startswith(TASK_PREFIX)})
    for task in tasks:
        txs, tys = _series(records, TASK_PREFIX + task)
        ax.plot(txs, tys, marker=".", linewidth=1, label=task)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(fontsize=8, loc="lower right")
    mark_stages(ax)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def report(workdir: str) -> str:
    """The table for `workdir`'s run, after writing its plots there; the text lists the plot files."""
    records = read_metrics(workdir)
    table = eval_table(records)
    paths = plot_curves(records, workdir)
    text = (table + "\n" if table else "No evaluation in this run.\n") + "Curves: " + ", ".join(paths)
    completions = os.path.join(workdir, "eval_completions")
    if os.path.isdir(completions) and os.listdir(completions):
        text += f"\nGreedy completions of every evaluation: {completions}/<stage>-step<N>.jsonl"
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m jaxvlm.report WORKDIR")
    print(report(sys.argv[1]))
