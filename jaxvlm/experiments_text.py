"""The `smollm2_math` comparison: base / SFT / GRPO / DyME on a real text checkpoint (configs/smollm2_math.py).

    python -m jaxvlm.experiments --only smollm2_math --model-path DIR --seeds 0,1,2 --out OUT
        [--eval-split test|validation] [--steps N] [--arms base,sft,grpo,dyme] [--keep-models]

Every arm is a variant of configs/smollm2_math.py run by the ordinary trainer from the checkpoint in DIR, with the
same prompt budget (steps x 4 prompts; an RL prompt yields G rollouts, an SFT example is one prompt) and the same
held-out evaluation: greedy, the same problems for every arm and seed (the gym's test split by default). The seed
changes the order of the training problems and the sampling, not the problems. The base arm decodes the unchanged
checkpoint greedily, which gives the same completions for every seed, so it runs once (under the first seed).

Written to OUT/smollm2_math/:
  results.json      per arm and seed: held-out accuracy, its binomial standard error sqrt(p(1-p)/N), accuracy per
                    difficulty (1 / 2 / 3 events), the share of replies in the format ("... The answer is N."), the
                    training curve (rollout accuracy and format reward per step; SFT: loss), prompts, wall time
  RESULTS_TABLE.md  mean ± std over seeds per arm, next to the evaluation's own noise
  results.png       accuracy per arm (bars: mean, black dots: seeds, thin bars: ± one binomial SE) and the RL
                    arms' rollout accuracy per step
  completions.md    the same held-out problems answered by every arm (before = base, after = each trained arm,
                    first seed): what the model writes, so a reader sees why accuracy moved
  runs/seed<s>/<arm>/  each run's workdir (metrics.jsonl, eval completions; checkpoints and final_model are deleted
                    once the arm's results are recorded, unless --keep-models)
An arm already in results.json is not re-run; an interrupted arm resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import time

import numpy as np

from jaxvlm import configuration

NAME = "smollm2_math"
ARMS = ("base", "sft", "grpo", "dyme")
LABELS = {"base": "base (no training)", "sft": "SFT", "grpo": "GRPO", "dyme": "DyME"}
CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{NAME}.py")
DIFFICULTY_LABELS = {"0": "1 event", "1": "2 events", "2": "3 events"}


def recipe():
    """The configs/smollm2_math.py module (its constants: rewards, prompt style, task mix, sizes)."""
    if not os.path.isfile(CONFIG_FILE):
        raise SystemExit(f"{CONFIG_FILE}: not found (run from a source checkout of jaxvlm, which has configs/)")
    spec = importlib.util.spec_from_file_location(f"jaxvlm_recipe_{NAME}", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm_config(
    arm: str, seed: int, model_path: str, *, tiny: bool = False, eval_split: str | None = None, steps: int = 0
):
    """The trainer config of one arm: the recipe's variant, the seed, the checkpoint, and optionally another held-out
    split or another step count (training arms)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {ARMS}")
    c = recipe().get_config(f"{arm}_tiny" if tiny else arm)
    c.seed = seed
    c.model.path = model_path
    c.train.progress = False
    if eval_split:
        c.eval.sources[0]["split"] = eval_split
        if arm == "base":
            c.stages.base.data.sources[0]["split"] = eval_split
    if steps and arm != "base":
        c.stages[arm].steps = steps
    configuration.check_config(c)
    return c


def prompts_of(c) -> int:
    """Training prompts an arm draws: steps x batch size over its training stages (0 for the base arm)."""
    return sum(c.stages[n].steps * c.stages[n].data.batch_size for n in c.stage_order if c.stages[n].mode != "eval")


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str, c) -> dict:
    """An arm's results from its workdir: the last evaluation (and its completions) and the training curve."""
    from jaxvlm import evaluation, rewards
    from jaxvlm.metrics import read_metrics
    from jaxvlm.report import stage_evaluations

    records = read_metrics(workdir)
    evals = stage_evaluations(records)
    if not evals:
        raise RuntimeError(f"{workdir}: no evaluation in metrics.jsonl")
    stage, step, final = evals[-1]
    if c.stages[stage].mode == "eval":
        completions = os.path.join(workdir, "eval", stage, "completions.jsonl")
    else:
        completions = evaluation.completions_path(workdir, stage, step)
    rows = _read_jsonl(completions)
    scores = np.asarray([row["score"] for row in rows], float)
    accuracy = float(scores.mean())
    difficulty = {}
    for key, value in final.items():
        if key.startswith("eval/accuracy/difficulty/"):
            difficulty[key.rsplit("/", 1)[-1]] = float(value)
    curve = {}
    for r in records:
        if "train/stage" not in r:
            continue
        for key in ("train/rewards/accuracy/mean", "train/rewards/format_final_answer/mean", "train/loss", "train/kl"):
            if isinstance(r.get(key), (int, float)):
                curve.setdefault(key.removeprefix("train/"), []).append([int(r["step"]), float(r[key])])
    return {
        "accuracy": accuracy,
        "examples": len(rows),
        "stderr": math.sqrt(accuracy * (1 - accuracy) / len(rows)),
        "difficulty": difficulty,
        "format": float(np.mean([rewards.format_final_answer(row["completion"]) for row in rows])),
        "completion_length": float(final.get("eval/completion_length", float("nan"))),
        "prompts": prompts_of(c),
        "completions": os.path.relpath(completions, os.path.dirname(os.path.dirname(os.path.dirname(workdir)))),
        "curve": curve,
    }


def run_arm(out: str, arm: str, seed: int, model_path: str, *, keep_models: bool = False, **options) -> dict:
    """Train (or evaluate) one arm in `out/runs/seed<seed>/<arm>` and return its results."""
    from jaxvlm import trainer

    c = arm_config(arm, seed, model_path, **options)
    workdir = os.path.join(out, "runs", f"seed{seed}", arm)
    t0 = time.perf_counter()
    if not trainer.run(c, workdir)["finished"]:
        raise SystemExit(f"{workdir}: stopped before the end; the same command resumes it")
    result = summarize(workdir, c)
    result["wall_s"] = time.perf_counter() - t0
    if not keep_models:
        for name in ("checkpoints", "final_model"):  # ~2 GB per arm for a 135M model with its optimizer state
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    return result


def _pm(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def table(results: dict) -> str:
    """Markdown: per arm, held-out accuracy mean ± std over seeds, the binomial standard error of one evaluation at
    that accuracy, accuracy per difficulty, the format share; then every seed's accuracy."""
    arms = [a for a in ARMS if a in results]
    levels = sorted({k for a in arms for r in results[a].values() for k in r["difficulty"]})
    head = ["arm", "seeds", "prompts", "accuracy (mean ± std over seeds)", "one evaluation's SE"]
    head += [f"{DIFFICULTY_LABELS.get(k, k)}" for k in levels] + ["format", "per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        seeds = results[arm]
        accs = [r["accuracy"] for r in seeds.values()]
        p, n = float(np.mean(accs)), int(np.mean([r["examples"] for r in seeds.values()]))
        cells = [
            LABELS[arm] + (" [run once: greedy decoding is the same for every seed]" if arm == "base" else ""),
            str(len(seeds)),
            "/".join(str(x) for x in sorted({r["prompts"] for r in seeds.values()})),
            f"**{_pm(accs)}**",
            f"± {math.sqrt(p * (1 - p) / n):.3f} (N = {n})",
        ]
        cells += [_pm([r["difficulty"].get(k, np.nan) for r in seeds.values()]) for k in levels]
        cells.append(_pm([r["format"] for r in seeds.values()]))
        cells.append(", ".join(f"{s}: {r['accuracy']:.3f}" for s, r in sorted(seeds.items())))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "accuracy: greedy, last number of the reply = the answer; format: the reply ends with one "
        '"The answer is N."; SE: sqrt(p(1-p)/N), the spread one evaluation of N problems has by itself.',
    ]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, arm in enumerate(arms):
        accs = [r["accuracy"] for r in results[arm].values()]
        mean = float(np.mean(accs))
        n = int(np.mean([r["examples"] for r in results[arm].values()]))
        se = math.sqrt(mean * (1 - mean) / n)
        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        ax1.bar(i, mean, yerr=std, capsize=6, color=f"C{i}", alpha=0.7)
        ax1.errorbar(i + 0.25, mean, yerr=se, fmt="none", ecolor="0.4", elinewidth=1, capsize=3)
        ax1.scatter([i] * len(accs), accs, color="black", s=12, zorder=3)
    ax1.set_xticks(range(len(arms)))
    ax1.set_xticklabels([LABELS[a] for a in arms], fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("held-out accuracy (greedy)")
    ax1.set_title("mean ± std over seeds (dots: seeds; grey: ± binomial SE)", fontsize=8)
    for i, arm in enumerate(arms):
        for s, (_, r) in enumerate(sorted(results[arm].items())):
            points = r["curve"].get("rewards/accuracy/mean")
            if not points:
                continue
            xs, ys = np.asarray(points).T
            k = min(5, len(ys))
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            label = LABELS[arm] if s == 0 else None
            ax2.plot(xs[k - 1 :], smooth, color=f"C{i}", linewidth=1, alpha=0.8, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"rollout accuracy (moving mean of {5})")
    ax2.set_ylim(0, 1)
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def completions_markdown(out: str, results: dict, problems: int = 8) -> str:
    """The same held-out problems with every arm's reply (first seed run of each arm): the problems where the arms'
    scores differ first, then the rest in order."""
    arms = [a for a in ARMS if a in results]
    if not arms:
        return ""
    replies = {}
    for arm in arms:
        seed, r = sorted(results[arm].items())[0]
        replies[arm] = (seed, {row["id"]: row for row in _read_jsonl(os.path.join(out, r["completions"]))})
    ids = list(replies[arms[0]][1])
    common = [i for i in ids if all(i in replies[a][1] for a in arms)]
    differ = [i for i in common if len({replies[a][1][i]["score"] for a in arms}) > 1]
    chosen = (differ + [i for i in common if i not in differ])[:problems]
    lines = [
        f"# Held-out replies per arm ({NAME})",
        "",
        "Greedy replies to the same held-out problems: before training (base) and after each arm (its first seed). "
        "Problems on which the arms' scores differ come first.",
        "",
    ]
    for pid in chosen:
        first = replies[arms[0]][1][pid]
        lines += [f"## {pid} ({DIFFICULTY_LABELS.get(str(first['difficulty']), first['difficulty'])})", ""]
        lines += [f"**Q:** {first['question']}  ", f"**reference answer:** {first['answer']}", ""]
        for arm in arms:
            seed, rows = replies[arm]
            row = rows[pid]
            lines.append(f"*{LABELS[arm]}, seed {seed}* — score {row['score']:.0f}")
            lines += ["```", row["completion"].strip() or "(empty)", "```"]
        lines.append("")
    return "\n".join(lines)


def write_outputs(out: str, results: dict) -> None:
    with open(os.path.join(out, "RESULTS_TABLE.md"), "w") as f:
        f.write(table(results) + "\n")
    plot(results, os.path.join(out, "results.png"))
    with open(os.path.join(out, "completions.md"), "w") as f:
        f.write(completions_markdown(out, results))


def run(
    out_root: str,
    model_path: str,
    seeds: list[int],
    *,
    arms=ARMS,
    keep_models: bool = False,
    tiny: bool = False,
    eval_split: str | None = None,
    steps: int = 0,
) -> dict:
    """Every arm for every seed (the base arm once), accumulating OUT/smollm2_math/results.json; returns the
    results."""
    if not model_path:
        raise SystemExit(f"--model-path is required for {NAME} (a Hugging Face checkpoint directory)")
    out = os.path.join(out_root, NAME)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    options = dict(tiny=tiny, eval_split=eval_split, steps=steps)
    for seed in seeds:
        for arm in arms:
            if arm == "base" and results.get("base"):
                continue  # greedy decoding of the unchanged checkpoint: the same for every seed
            if str(seed) in results.get(arm, {}):
                continue
            result = run_arm(out, arm, seed, model_path, keep_models=keep_models, **options)
            print(
                f"[{NAME}] {LABELS[arm]} seed {seed}: accuracy {result['accuracy']:.3f} ± {result['stderr']:.3f} "
                f"(N = {result['examples']}, {result['wall_s']:.0f} s)",
                flush=True,
            )
            results.setdefault(arm, {})[str(seed)] = result
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
            write_outputs(out, results)
    write_outputs(out, results)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default="", help=f"{NAME}: a Hugging Face checkpoint directory")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"{NAME}: comma-separated arms of {ARMS}")
    parser.add_argument("--eval-split", default=None, choices=("validation", "test"), help=f"{NAME}: held-out split")
    parser.add_argument("--steps", type=int, default=0, help=f"{NAME}: steps of every training arm (0: the config's)")
    parser.add_argument("--keep-models", action="store_true", help=f"{NAME}: keep checkpoints and final models")


def main_from_args(args) -> dict:
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; arms: {','.join(ARMS)}")
    results = run(
        args.out,
        args.model_path,
        [int(x) for x in args.seeds.split(",")],
        arms=arms,
        keep_models=args.keep_models,
        eval_split=args.eval_split,
        steps=args.steps,
    )
    print(open(os.path.join(args.out, NAME, "RESULTS_TABLE.md")).read())
    return results
