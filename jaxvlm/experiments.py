"""The papers' comparisons in miniature, on the gym (RESULTS.md): one command runs them and writes the table and plots.

    python -m jaxvlm.experiments --out /tmp/jaxvlm-results [--seeds 0,1,2] [--only dyme,clgrpo] [--budget quick]

Every arm is a config of the ordinary trainer (`jaxvlm.trainer.run`), with the tiny model from scratch, the built-in
tokenizer and the dyme prompt format ("reasoning\\nAnswer: x") throughout, so arms differ only in what the comparison
is about. Arms that share a beginning share it exactly: the shared prefix (e.g. the SFT warm-up) is trained once per
seed and each arm continues from a copy of its workdir (the trainer resumes after the completed stages).

Sample budget: every arm of a comparison draws the same number of training *prompts* (SFT examples or RL prompts;
an RL prompt yields G rollouts). Accuracy is greedy, on the gym's validation split, at the end of the arm.

Comparisons (`COMPARISONS`):
  sft_vs_rl   SFT only | SFT only at the RL phase's lr | GRPO only (from scratch) | SFT -> GRPO   (two-stage)
  dyme        SFT -> DyME "prompt" | SFT -> DyME "batch"                            (DyME's switch granularity)
  curriculum  SFT -> GRPO yes/no -> choice -> open | SFT -> GRPO on the same data shuffled   (Curr-ReFT)
  clgrpo      SFT -> GRPO (format + acc), then ClipLow GRPO (eps_low 0.1) | then more stage-3 GRPO   (CLGRPO)
  infi_mmr    SFT -> RL text-only -> caption-augmented -> caption-free | SFT -> RL caption-free only (Infi-MMR)

Results accumulate in `<out>/results.json` (an arm already there is not re-run), `<out>/RESULTS_TABLE.md` and
`<out>/results.png` are rewritten after every arm.

On a real checkpoint (`jaxvlm.experiments_text`): `--only smollm2_math --model-path DIR` runs base / SFT / GRPO / DyME
of configs/smollm2_math.py (SmolLM2-135M-Instruct on the gym's word problems) per seed into `<out>/smollm2_math/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import numpy as np

from jaxvlm import configuration
from jaxvlm.configuration import base_config, gym_source, stage

VISUAL_TASKS = ("exists", "count_choice", "count")  # Curr-ReFT's order: yes/no -> multiple choice -> open
TEXT_TASK = "word_arithmetic"
DIFFICULTIES = (0, 1)
GRPO_REWARDS = ["format_dyme", {"name": "accuracy", "kwargs": {"extract": "dyme"}}]
DYME_REWARDS = [
    "format_dyme",
    {"name": "think_f1", "kwargs": {"extract": "dyme"}},
    {"name": "accuracy", "kwargs": {"extract": "dyme"}},
]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and sizes. prompts(SFT step) = sft_batch, prompts(RL step) = rl_batch."""

    warmup_steps: int  # the shared SFT warm-up (batch sft_batch)
    rl_steps: int  # RL steps after the warm-up (batch rl_batch x G)
    sft_batch: int = 16
    rl_batch: int = 8
    num_generations: int = 8
    eval_examples: int = 96
    sft_lr: float = 3e-3
    # 3e-4 and temperature 0.7, as in configs/demo.py: at 1e-3 and 1.0 the tiny model's first RL steps knocked its
    # held-out accuracy from ~0.64 to ~0.29 (RESULTS.md).
    rl_lr: float = 3e-4
    temperature: float = 0.7
    max_new_tokens: int = 96


BUDGETS = {"quick": Budget(warmup_steps=100, rl_steps=30), "full": Budget(warmup_steps=150, rl_steps=120)}


def _gym(split, n, tasks, seed=0):
    return gym_source(split, n, tasks=tuple(tasks), difficulties=DIFFICULTIES, seed=seed)


def _data(tasks, *, caption=True, targets=True, batch, seed=1, shuffle=True):
    """A stage's data; `targets`: an SFT stage's reference completions are tokenized to 128 tokens (RL stages have
    none, and DyME's are tokenized at the rollouts' width)."""
    data = dict(
        sources=[_gym("train", 4000, tasks, seed)],
        batch_size=batch,
        prompt_style="dyme",
        with_caption=caption,
        max_prompt_length=256,
        on_error="skip",
        shuffle=shuffle,
    )
    if targets:
        data["max_target_length"] = 128
    return data


def sft_stage(b: Budget, steps: int, tasks=VISUAL_TASKS, seed=0, caption=True, lr=None):
    return stage(
        "sft",
        steps=steps,
        data=_data(tasks, caption=caption, batch=b.sft_batch, seed=seed),
        optimizer=dict(
            learning_rate=lr or b.sft_lr, schedule="constant", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0
        ),
        loss=dict(sft_aggregation="token"),
    )


def rl_stage(
    b: Budget,
    steps: int,
    tasks=VISUAL_TASKS,
    *,
    mode="grpo",
    caption=True,
    granularity="prompt",
    eps_low=0.2,
    num_iterations=1,
    mini_batches=1,
    batch=None,
    generations=None,
    seed=1,
):
    return stage(
        mode,
        steps=steps,
        data=_data(tasks, caption=caption, targets=False, batch=batch or b.rl_batch, seed=seed),
        rewards=DYME_REWARDS if mode == "dyme" else GRPO_REWARDS,
        accuracy_reward="accuracy",
        optimizer=dict(learning_rate=b.rl_lr, schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0),
        loss=dict(
            beta=0.0,
            num_iterations=num_iterations,
            aggregation="grpo",
            advantage_scale="group",
            eps_low=eps_low,
            eps_high=0.2,
            **({"dyme_granularity": granularity} if mode == "dyme" else {}),
        ),
        sampling=dict(
            num_generations=generations or b.num_generations, max_new_tokens=b.max_new_tokens, temperature=b.temperature
        ),
        batch=dict(micro_batches=1, mini_batches=mini_batches),
    )


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def arms(comparison: str, b: Budget) -> dict[str, list[tuple[str, object]]]:
    """{arm name: [(stage name, stage config), ...]}; arms sharing a stage-name prefix share those stages' runs."""
    w, r = b.warmup_steps, b.rl_steps
    warm = ("warmup", sft_stage(b, w))
    rl_prompts = r * b.rl_batch
    if comparison == "sft_vs_rl":
        total_prompts = w * b.sft_batch + rl_prompts
        return {
            "SFT only": [warm, ("sft_more", sft_stage(b, rl_prompts // b.sft_batch, seed=1))],
            # A control for the RL phase's lower learning rate: the same SFT continuation at the RL learning rate
            # (does an RL phase help, or does any low-lr phase after a high-lr warm-up?).
            "SFT only, RL's lr": [
                warm,
                ("sft_more_rl_lr", sft_stage(b, rl_prompts // b.sft_batch, seed=1, lr=b.rl_lr)),
            ],
            # From scratch, with the same prompts: G 4 x 16 prompts per step keeps the rollout count per step.
            "GRPO only": [("grpo_scratch", rl_stage(b, total_prompts // 16, batch=16, generations=4))],
            "SFT -> GRPO": [warm, ("grpo", rl_stage(b, r))],
        }
    if comparison == "dyme":
        return {
            "DyME prompt": [warm, ("dyme_prompt", rl_stage(b, r, mode="dyme", granularity="prompt"))],
            "DyME batch": [warm, ("dyme_batch", rl_stage(b, r, mode="dyme", granularity="batch"))],
        }
    if comparison == "curriculum":
        steps = _split(r, 3)
        curriculum = [(f"cur_{t}", rl_stage(b, n, (t,))) for t, n in zip(VISUAL_TASKS, steps)]
        return {
            "curriculum yes/no -> choice -> open": [warm, *curriculum],
            "same data shuffled": [warm, ("grpo", rl_stage(b, r))],
        }
    if comparison == "clgrpo":
        s3, s4 = _split(r, 2)
        stage3 = ("stage3", rl_stage(b, s3, num_iterations=2, mini_batches=2))
        return {
            "stage 4 ClipLow (eps_low 0.1)": [
                warm,
                stage3,
                ("cliplow", rl_stage(b, s4, eps_low=0.1, num_iterations=2, mini_batches=2)),
            ],
            "stage 3 continued (eps_low 0.2)": [
                warm,
                stage3,
                ("stage3_more", rl_stage(b, s4, num_iterations=2, mini_batches=2)),
            ],
        }
    if comparison == "infi_mmr":
        # The warm-up here includes the text-only task, so phase 1 has something to reinforce; evaluation is
        # caption-free (the phases' goal).
        warm_text = ("warmup_text", sft_stage(b, w, tasks=(*VISUAL_TASKS, TEXT_TASK)))
        p1, p2, p3 = _split(r, 3)
        return {
            "text -> caption -> caption-free": [
                warm_text,
                ("text", rl_stage(b, p1, (TEXT_TASK,), caption=False)),  # text-only: no image, no caption
                ("captioned", rl_stage(b, p2, caption=True)),
                ("caption_free", rl_stage(b, p3, caption=False)),
            ],
            "caption-free only": [warm_text, ("mm_only", rl_stage(b, r, caption=False))],
        }
    raise ValueError(f"unknown comparison {comparison!r}; known: {COMPARISONS}")


COMPARISONS = ("sft_vs_rl", "dyme", "curriculum", "clgrpo", "infi_mmr")


def _eval_source(b: Budget) -> dict:
    return _gym("validation", b.eval_examples, VISUAL_TASKS)


def arm_config(stages, b: Budget, seed: int):
    """The trainer config of one arm. Evaluation follows the stage being evaluated (its prompt format, captions or
    not), so an arm ending caption-free is evaluated caption-free."""
    c = base_config()
    c.seed = seed
    c.model.update(preset="tiny", path="", min_pixels=56 * 56, max_pixels=56 * 56)
    c.mesh.shape = (1, 1, 1)
    c.stage_order = tuple(n for n, _ in stages)
    for name, s in stages:
        c.stages[name] = s
    c.eval.update(sources=[_eval_source(b)], num_examples=b.eval_examples, batch_size=32)
    c.eval.sampling.max_new_tokens = b.max_new_tokens
    c.train.update(eval_every=0, save_every=10_000, keep_checkpoints=1, log_every=5, progress=False)
    configuration.check_config(c)
    return c


def _prompts(stages, b: Budget) -> int:
    return sum(s.steps * s.data.batch_size for _, s in stages)


def run_arm(out: str, stages, b: Budget, seed: int) -> dict:
    """Train one arm (continuing from the longest already-trained prefix of its stages) and return its results."""
    from jaxvlm import trainer
    from jaxvlm.metrics import read_metrics
    from jaxvlm.report import stage_evaluations

    names = [n for n, _ in stages]
    root = os.path.join(out, "runs", f"seed{seed}")
    workdir = os.path.join(root, "+".join(names))
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(workdir, "final_model", "config.json")):
        if len(names) > 1 and not os.path.isdir(workdir):
            # Every prefix is a run of its own, trained once and shared by the arms that start so; the copy is made
            # under another name and renamed, so an interrupted copy is never taken for a started arm.
            run_arm(out, stages[:-1], b, seed)
            shutil.rmtree(workdir + ".copy", ignore_errors=True)
            shutil.copytree(
                os.path.join(root, "+".join(names[:-1])),
                workdir + ".copy",
                ignore=shutil.ignore_patterns("final_model"),
            )
            os.replace(workdir + ".copy", workdir)
        # An arm that was interrupted (SIGTERM, a crash) resumes from its last checkpoint.
        if not trainer.run(arm_config(stages, b, seed), workdir)["finished"]:
            raise SystemExit(f"{workdir}: stopped before the end; the same command resumes it")
    evals = stage_evaluations(read_metrics(workdir))
    final = evals[-1][2]
    return {
        "accuracy": final["eval/accuracy"],
        "stages": [[s, step, r["eval/accuracy"]] for s, step, r in evals],
        "tasks": {k.split("/")[-1]: v for k, v in final.items() if k.startswith("eval/accuracy/task/")},
        "prompts": _prompts(stages, b),
        "wall_s": time.perf_counter() - t0,
    }


def table(results: dict) -> str:
    """Markdown: per comparison, mean +- std (over seeds) of the final held-out accuracy, overall and per task."""
    lines = []
    for comparison, arms_ in results.items():
        tasks = sorted({t for seeds in arms_.values() for r in seeds.values() for t in r["tasks"]})
        lines += [
            f"**{comparison}**",
            "",
            "| arm | seeds | prompts | accuracy | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---|" * len(tasks),
        ]
        for arm, seeds in arms_.items():
            accs = np.array([r["accuracy"] for r in seeds.values()])
            cells = [f"{_pm([r['tasks'].get(t, np.nan) for r in seeds.values()])}" for t in tasks]
            prompts = sorted({r["prompts"] for r in seeds.values()})
            lines.append(
                f"| {arm} | {len(accs)} | {'/'.join(map(str, prompts))} | **{_pm(accs)}** | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def majority_answer_accuracy(b: Budget) -> dict[str, float]:
    """Held-out accuracy of answering every question of a task with that task's most common answer (no model): the
    floor a trained arm must clear before its accuracy says anything about reading or counting. Computed on the
    evaluation's own source entry (`arm_config`), so on exactly the examples the arms are scored on."""
    from collections import Counter

    from jaxvlm.data.sources import make_source

    source = make_source(_eval_source(b))
    answers = {task: Counter() for task in VISUAL_TASKS}
    for i in range(len(source)):
        example = source[i]
        answers[example["task"]][example["answer"]] += 1
    out = {task: c.most_common(1)[0][1] / sum(c.values()) for task, c in answers.items()}
    out["all"] = sum(c.most_common(1)[0][1] for c in answers.values()) / len(source)
    return out


def _pm(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def plot(results: dict, path: str, floor: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.8), squeeze=False)
    for ax, (comparison, arms_) in zip(axes[0], results.items()):
        names = list(arms_)
        accs = [[r["accuracy"] for r in arms_[a].values()] for a in names]
        ax.bar(
            range(len(names)),
            [np.mean(a) for a in accs],
            yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in accs],
            capsize=4,
            color="C0",
        )
        for i, a in enumerate(accs):
            ax.scatter([i] * len(a), a, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        if floor is not None:
            ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label="majority answer")
        ax.set_title(comparison, fontsize=9)
    axes[0][0].set_ylabel("held-out accuracy (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    from jaxvlm import experiments_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--only",
        default=",".join(COMPARISONS),
        help=f"comma-separated comparisons: {', '.join(COMPARISONS)} (the gym, tiny model), or "
        f"{experiments_text.NAME} (a real checkpoint: --model-path)",
    )
    parser.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    experiments_text.add_arguments(parser)
    args = parser.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = [c for c in only if c not in (*COMPARISONS, experiments_text.NAME)]
    if unknown:
        parser.error(
            f"--only: unknown comparison(s) {unknown}; known: {', '.join(COMPARISONS)}, {experiments_text.NAME}"
        )
    if experiments_text.NAME in only:
        text_results = experiments_text.main_from_args(args)
        only.remove(experiments_text.NAME)
        if not only:
            return {experiments_text.NAME: text_results}
    args.only = ",".join(only)
    b = BUDGETS[args.budget]
    out = os.path.join(args.out, args.budget)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for comparison in args.only.split(","):
            for arm, stages in arms(comparison, b).items():
                done = results.get(comparison, {}).get(arm, {})
                if str(seed) in done:
                    continue
                result = run_arm(out, stages, b, seed)
                print(
                    f"[{comparison}] {arm} seed {seed}: accuracy {result['accuracy']:.3f} ({result['wall_s']:.0f} s)",
                    flush=True,
                )
                results.setdefault(comparison, {}).setdefault(arm, {})[str(seed)] = result
                with open(path, "w") as f:
                    json.dump(results, f, indent=1)
                _write_outputs(results, b, out)
    _write_outputs(results, b, out)
    print(open(os.path.join(out, "RESULTS_TABLE.md")).read())
    return results


def _write_outputs(results: dict, b: Budget, out: str) -> None:
    prior = majority_answer_accuracy(b)
    with open(os.path.join(out, "RESULTS_TABLE.md"), "w") as f:
        f.write(
            "Majority answer per task, no model (the floor): "
            + ", ".join(f"{k} {v:.3f}" for k, v in prior.items())
            + "\n\n"
            + table(results)
        )
    plot(results, os.path.join(out, "results.png"), floor=prior["all"])


if __name__ == "__main__":
    main()
