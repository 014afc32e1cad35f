"""Evaluation: decode on held-out sources and score with the accuracy reward, overall, per task and per difficulty.

Two callers share `evaluate`: the evaluation during and after every training stage (`config.eval`, in the stage's
prompt format: `task_for_stage`) and eval stages (`jaxvlm.stages.eval`, what `python -m jaxvlm.evaluate` runs:
`task_for_eval_stage`). Greedy by default; with `sampling.num_generations = k > 1` (and a temperature > 0) every
example gets k samples: `accuracy` is the mean over all samples and `pass@k` the mean over examples of their best
sample's score (for 0/1 scores: the share of examples with a correct sample).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxvlm import rewards, rollouts, sharding
from jaxvlm.configuration import EvalSpec, StageSpec
from jaxvlm.data import pipeline, sources
from jaxvlm.data.pipeline import PipelineConfig
from jaxvlm.sampling import SamplingParams

# How each prompt style's completions are read: the answer (rewards.extract_answer) and, except for "plain" (answer
# only), the reasoning (rewards.think_f1_reward).
EXTRACT = {"r1": "tags", "dyme": "dyme", "plain": "raw", "final_answer": "last_number"}


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """What one evaluation reads: data (sources + pipeline), how many examples, how to sample, how to score."""

    sources: tuple[dict, ...]
    data: PipelineConfig
    num_examples: int  # 0: every example of the sources
    sampling: SamplingParams
    accuracy: rewards.RewardSpec
    save_completions: bool = True
    rewards: tuple = ()  # further rewards reported as reward/<name> (an eval stage's `rewards`)


def accuracy_spec(specs: tuple, accuracy_reward: str, prompt_style: str) -> rewards.RewardSpec:
    """The stage's correctness reward (its `accuracy_reward` entry), else accuracy for its prompt style."""
    names = rewards.display_names(specs)
    if accuracy_reward in names:
        return specs[names.index(accuracy_reward)]
    return rewards.RewardSpec("accuracy", 1.0, {"extract": EXTRACT[prompt_style]})


def task_for_stage(e: EvalSpec, stage: StageSpec) -> EvalTask:
    """The evaluation of a training stage: `config.eval`'s sources, size and sampling, in the stage's prompt format,
    scored with the stage's accuracy reward; whole batches only (num_examples rounded down to them)."""
    d = stage.data
    data = PipelineConfig(
        batch_size=e.batch_size,
        prompt_style=d.prompt_style,
        with_caption=d.with_caption,
        max_prompt_length=d.max_prompt_length,
        max_image_pixels=d.max_image_pixels,
        shuffle=False,
        num_epochs=1,
        drop_remainder=True,
        prefetch=0,
        on_error=d.on_error,
        shard_by_process=False,
    )
    return EvalTask(
        e.sources,
        data,
        e.num_examples,
        e.sampling,
        accuracy_spec(stage.rewards, stage.accuracy_reward, d.prompt_style),
        e.save_completions,
    )


def task_for_eval_stage(stage: StageSpec) -> EvalTask:
    """An eval stage: every example of its sources (or `num_examples`), the last batch padded by a smaller one."""
    return EvalTask(
        stage.sources,
        stage.data,
        stage.num_examples,
        stage.sampling,
        accuracy_spec(stage.rewards, stage.accuracy_reward, stage.data.prompt_style),
        rewards=stage.rewards,
    )


def completions_path(workdir: str, stage: str, step: int) -> str:
    """Where a training stage's evaluation at `step` writes its completions (JSON lines)."""
    return os.path.join(workdir, "eval_completions", f"{stage}-step{step:06d}.jsonl")


def evaluate(rt, params, task: EvalTask, completions_file: str | None = None) -> dict[str, float]:
    """Decode `task`'s examples and score them; metrics: accuracy (and pass@k), overall, per task and per difficulty,
    completion length, think_f1 for prompt styles with reasoning, examples (and skipped bad records).

    `think_f1` is the mean word-overlap F1 of the reasoning with the examples' reference reasoning (DyME's thinking
    reward; examples without a reference are left out). It counts template words too, so read the completions to see
    whether the reasoning reads its input: accuracy alone does not show it. With `completions_file` (and
    `task.save_completions`), every completion is written there, one JSON line per sample: id, task, difficulty,
    question, reference answer, completion, score (and the reference reasoning with think_f1)."""
    rows, lengths, skipped = _decode_and_score(rt, params, task)
    if not rows:
        raise ValueError(
            f"eval: no example to score in {list(task.sources)} (batch_size {task.data.batch_size}, "
            f"drop_remainder {task.data.drop_remainder})"
        )
    metrics = _metrics(rows, lengths, task)
    if skipped and sum(skipped.values()):
        metrics.update(pipeline.skip_metrics(skipped))
    if completions_file and task.save_completions and rt.is_main:
        write_jsonl(completions_file, rows)
    return metrics


def _decode_and_score(rt, params, task: EvalTask) -> tuple[list[dict], list[int], dict | None]:
    data = {"sources": [dict(e) for e in task.sources], **dataclasses.asdict(task.data)}
    iterator = iter(sources.input_pipeline(data, rt.tokenizer, rt.image_processor, rt.model_config))
    k = task.sampling.num_generations
    specs = (task.accuracy, *task.rewards)
    names = rewards.display_names(specs)
    extract = EXTRACT[task.data.prompt_style]
    dp = sharding.data_parallel_size(rt.mesh)
    rows, lengths, seen, skipped = [], [], 0, None
    key = jax.random.key(0)
    for step, batch in enumerate(iterator):
        if task.num_examples and seen >= task.num_examples:
            break
        skipped = pipeline.add_skip_counts(skipped, batch)
        examples = batch["examples"]
        out = rollouts.sample_and_score(
            rt,
            params,
            batch,
            jax.random.fold_in(key, step),
            task.sampling,
            specs,
            None,
            on_mesh=len(examples) % dp == 0,
        )
        for i, (completion, example) in enumerate(zip(out.completions, out.examples)):
            if task.num_examples and seen + i // k >= task.num_examples:
                break
            rows.append(_row(completion, example, out.scores.per_reward[i], names, extract, i % k, k))
            lengths.append(int(out.lengths[i]))
        seen += len(examples)
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return rows, lengths, skipped


def _row(completion: str, example: dict, scores: np.ndarray, names, extract: str, sample: int, k: int) -> dict:
    row = {
        "id": example.get("id", ""),
        "task": example.get("task", "") or "unknown",
        "difficulty": int(example.get("difficulty", 0)),
        "question": example.get("question", ""),
        "answer": str(example.get("answer", "")),
        "completion": completion,
        "score": float(scores[0]),
    }
    if k > 1:
        row["sample"] = sample
    for name, value in zip(names[1:], scores[1:]):
        row[f"reward/{name}"] = float(value)
    if extract != "raw" and example.get("reasoning"):
        row["reasoning"] = str(example["reasoning"])
        row["think_f1"] = rewards.think_f1_reward(completion, example, extract=extract)
    return row


def _metrics(rows: list[dict], lengths: list[int], task: EvalTask) -> dict[str, float]:
    k = task.sampling.num_generations
    scores = np.asarray([row["score"] for row in rows])
    metrics = {
        "accuracy": float(scores.mean()),
        "completion_length": float(np.mean(lengths)),
        "examples": float(len(rows) // k),
    }
    if k > 1:
        metrics[f"pass@{k}"] = float(scores[: len(rows) // k * k].reshape(-1, k).max(-1).mean())
    thinking = [row["think_f1"] for row in rows if "think_f1" in row]
    if thinking:
        metrics["think_f1"] = float(np.mean(thinking))
    for name in [key for key in rows[0] if key.startswith("reward/")]:
        metrics[name] = float(np.mean([row[name] for row in rows]))
    for field in ("task", "difficulty"):
        groups = np.asarray([row[field] for row in rows])
        for value in sorted(set(groups.tolist())):
            metrics[f"accuracy/{field}/{value}"] = float(scores[groups == value].mean())
    return metrics


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
