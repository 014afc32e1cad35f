"""DAPO's dynamic sampling (Yu et al. 2025, §3.2) for grpo stages: keep sampling until the batch is full of groups
that carry a learning signal.

A group (the G rollouts of one prompt) whose total rewards all agree has zero std, so every advantage in it is 0 and
it adds nothing to the policy gradient (`losses.group_advantages`; the groups counted in `frac_reward_zero_std`). With
`stages.<name>.dynamic_sampling.enabled`, a grpo step samples and scores its data batch, drops those groups, draws
the next batch from the stage's own data iterator, samples and scores it, and repeats until `batch_size` groups with
a signal are kept or `max_rounds` batches have been sampled (the step's own batch counts as round 1). Kept groups
beyond `batch_size` are discarded, first come first kept (as verl's `filter_groups` cuts the concatenated batch).

Shapes are static, so a step that ends short (the round bound reached, or finite data run out) either fills the
batch with the first dropped groups (`on_short="fill"`, the default: their advantage is 0, no policy gradient; a
warning is logged) or stops with `ShortBatchError` naming the key (`on_short="error"`, verl's and EasyR1's
behaviour). The batch keeps the sampling order of its groups; each row keeps its prompt's images.

Peers: verl's `algorithm.filter_groups` (`enable`, `metric`, `max_num_gen_batches`: 0 = unbounded by default, 10 in
the DAPO recipe's scripts, which filter on `acc`), EasyR1's `algorithm.online_filtering` (a group's mean score
outside [0.01, 0.99], `max_try_make_batch`); TRL 1.16 has none. `filter` chooses what must differ within a group:
"reward" (the default), the total reward, the same test as `losses.group_reward_stats`' zero_std_fraction; or
"accuracy", the stage's accuracy reward: DAPO's rule (drop the prompts whose accuracy is 0 or 1) and verl's
`metric=acc`, which matters when a shaping reward (`soft_overlong`) makes almost every group's totals differ. Batches
are drawn at the stage's `batch_size` (verl's `gen_batch_size` may be larger).

The selection is pure host-side numpy (`signal_groups`, `select_groups`, `concat_rollouts`, `take_rows`); the
sampling loop (`sample_rounds`) takes the sampler and the data as callables, and `jaxvlm.stages.grpo` wires them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from jaxvlm import checks, rewards
from jaxvlm.configuration import check_section
from jaxvlm.rollouts import Rollouts

ON_SHORT = ("fill", "error")
FILTERS = ("reward", "accuracy")
PREFIX = "dynamic_sampling/"


class ShortBatchError(RuntimeError):
    """A step could not keep `batch_size` groups with a signal and the stage's `on_short` is "error"."""


@dataclasses.dataclass(frozen=True)
class DynamicSampling:
    """`stages.<name>.dynamic_sampling` of a grpo stage."""

    enabled: bool = False
    max_rounds: int = 10  # sampled batches per step in all, the step's own included (verl's max_num_gen_batches)
    on_short: str = "fill"  # fill: complete the batch with zero-signal groups (advantage 0); error: stop
    filter: str = "reward"  # what must differ within a group to keep it: the total reward, or the accuracy reward


RULES = {
    "enabled": checks.boolean,
    "max_rounds": checks.integer(1),
    "on_short": checks.one_of(*ON_SHORT),
    "filter": checks.one_of(*FILTERS),
}


def section() -> ml_collections.ConfigDict:
    """The config section at its defaults."""
    return ml_collections.ConfigDict(dataclasses.asdict(DynamicSampling()))


def resolve(values: ml_collections.ConfigDict, key: str) -> DynamicSampling:
    """The section, checked (ConfigError naming `config.<key>.<field>`); every key is checked, enabled or not."""
    check_section(values, RULES, key)
    return DynamicSampling(
        enabled=bool(values.enabled),
        max_rounds=int(values.max_rounds),
        on_short=str(values.on_short),
        filter=str(values.filter),
    )


# ----------------------------------------------------------------------------------------------------------
# Selection (pure)
# ----------------------------------------------------------------------------------------------------------


def signal_groups(totals: np.ndarray, group_size: int) -> np.ndarray:
    """bool [P]: whether each group of `totals` [P * G] (groups contiguous) has a signal, i.e. at least two valid
    (non-NaN) rewards that differ. The complement of `losses.group_reward_stats`' "all valid rewards equal"."""
    totals = np.asarray(totals, np.float64)
    if group_size < 2 or totals.ndim != 1 or totals.size % group_size:
        raise ValueError(f"{totals.shape} rewards cannot be cut into groups of {group_size} (G >= 2)")
    grouped = totals.reshape(-1, group_size)
    valid = ~np.isnan(grouped)
    largest = np.max(np.where(valid, grouped, -np.inf), axis=1)
    smallest = np.min(np.where(valid, grouped, np.inf), axis=1)
    return (valid.sum(axis=1) >= 2) & (largest != smallest)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which sampled groups make the step's batch, and the counts behind it.

    groups: indices of the chosen groups among all sampled ones (round-major, in sampling order), ascending.
    kept: signal groups in the batch; dropped: zero-signal groups sampled; surplus: signal groups sampled beyond
    batch_size and discarded; filled: zero-signal groups put in the batch to complete it (on_short="fill").
    Always sampled = kept + dropped + surplus and batch_size = kept + filled.
    """

    groups: np.ndarray
    rounds: int
    sampled: int
    kept: int
    dropped: int
    surplus: int
    filled: int

    @property
    def short(self) -> bool:
        return self.filled > 0

    def metrics(self) -> dict[str, float]:
        """`dynamic_sampling/<count>`: this step's rounds and group counts."""
        counts = dict(
            rounds=self.rounds,
            groups_sampled=self.sampled,
            groups_kept=self.kept,
            groups_dropped=self.dropped,
            groups_surplus=self.surplus,
            groups_filled=self.filled,
        )
        return {PREFIX + k: float(v) for k, v in counts.items()}


def select_groups(signal: np.ndarray, batch_size: int, rounds: int = 1) -> Selection:
    """The batch from the signal flags of all sampled groups (bool [P_all], sampling order): the first `batch_size`
    signal groups; when fewer, completed with the first zero-signal groups (whether a short batch may run is the
    caller's `on_short`). `rounds`: how many batches were sampled (for the counts)."""
    signal = np.asarray(signal, bool)
    if len(signal) < batch_size:
        raise ValueError(f"{len(signal)} groups sampled, fewer than batch_size={batch_size}")
    with_signal, without = np.flatnonzero(signal), np.flatnonzero(~signal)
    kept = with_signal[:batch_size]
    filled = without[: batch_size - len(kept)]
    return Selection(
        groups=np.sort(np.concatenate([kept, filled])),
        rounds=rounds,
        sampled=len(signal),
        kept=len(kept),
        dropped=len(without),
        surplus=len(with_signal) - len(kept),
        filled=len(filled),
    )


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
    """Row indices [len(groups) * G] of groups (row g*G + j is group g's rollout j)."""
    groups = np.asarray(groups, np.int64)
    return (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# Rows of several sampled batches
# ----------------------------------------------------------------------------------------------------------


def pad_prompts(rows: dict, width: int, pad_id: int) -> dict:
    """Update rows (`sampling.update_rows`) with their prompts left-padded to `width` columns: prompt_ids with
    `pad_id`, prompt_mask and the prompt part of position_ids [3, R, T+N] with 0 (what the pipeline pads with)."""
    t = rows["prompt_ids"].shape[1]
    extra = width - t
    if extra < 0:
        raise ValueError(f"prompts of width {t} do not fit in {width} columns")
    if extra == 0:
        return dict(rows)
    out = dict(rows)
    out["prompt_ids"] = np.pad(rows["prompt_ids"], ((0, 0), (extra, 0)), constant_values=pad_id)
    out["prompt_mask"] = np.pad(rows["prompt_mask"], ((0, 0), (extra, 0)))
    out["position_ids"] = np.pad(rows["position_ids"], ((0, 0), (0, 0), (extra, 0)))
    return out


def take_rows(rows: dict, index: np.ndarray) -> dict:
    """The rows `index` of update rows: the row axis is 0, except position_ids [3, R, S] (axis 1)."""
    return {k: np.take(np.asarray(v), index, axis=1 if k == "position_ids" else 0) for k, v in rows.items()}


def concat_scores(results: Sequence[rewards.RewardResult]) -> rewards.RewardResult:
    """RewardResults of several batches (same reward specs) as one: rows concatenated, counts summed."""
    first = results[0]
    if any(r.names != first.names for r in results):
        raise ValueError(f"reward columns differ between batches: {[r.names for r in results]}")
    return rewards.RewardResult(
        per_reward=np.concatenate([r.per_reward for r in results]),
        total=np.concatenate([r.total for r in results]),
        names=first.names,
        failures={n: sum(r.failures.get(n, 0) for r in results) for n in first.names},
        timeouts={n: sum(r.timeouts.get(n, 0) for r in results) for n in first.names},
    )


def concat_rollouts(outs: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """Rollouts of several batches as one, rows in order; prompts left-padded to the widest batch's width (the
    pipeline pads each batch to its own length bucket). Completion widths are the sampler's static max_new_tokens."""
    if len(outs) == 1:
        return outs[0]
    width = max(out.rows["prompt_ids"].shape[1] for out in outs)
    padded = [pad_prompts(out.rows, width, pad_id) for out in outs]
    rows = {k: np.concatenate([p[k] for p in padded], axis=1 if k == "position_ids" else 0) for k in padded[0]}
    return Rollouts(
        completions=[c for out in outs for c in out.completions],
        examples=[e for out in outs for e in out.examples],
        scores=concat_scores([out.scores for out in outs]),
        accuracy=np.concatenate([out.accuracy for out in outs]),
        rows=rows,
        lengths=np.concatenate([np.asarray(out.lengths) for out in outs]),
        truncated=np.concatenate([np.asarray(out.truncated) for out in outs]),
    )


NO_IMAGES = (np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int64))  # a text-only row's entry in row pixels


def concat_pixels(per_round: Sequence[list | None], rows_per_round: Sequence[int]) -> list | None:
    """Row pixels (`stages.base.row_pixels`) of several batches as one list; a text-only batch (None) gets an empty
    entry per row; None when no batch has images."""
    if all(p is None for p in per_round):
        return None
    out = []
    for pixels, rows in zip(per_round, rows_per_round):
        out.extend([NO_IMAGES] * rows if pixels is None else pixels)
    return out


# ----------------------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One sampled batch: the pipeline batch, its scored rollouts and its groups' signal flags."""

    batch: dict
    out: Rollouts
    signal: np.ndarray  # bool [P]
    metrics: dict[str, float]  # the sampler's per-batch metrics (time/rollout_s, ...)


def sample_rounds(
    batch: dict,
    draw: Callable[[], dict | None],
    sample: Callable[[dict, int], tuple[Rollouts, dict[str, float]]],
    *,
    batch_size: int,
    group_size: int,
    max_rounds: int,
    filter: str = "reward",
) -> tuple[list[Round], bool]:
    """Sample `batch` (round 0: `sample(batch, 0)`), then while fewer than `batch_size` groups have a signal and
    fewer than `max_rounds` batches were sampled, `draw()` the next batch and sample it (`sample(next, r)`). A
    group's signal: its total rewards differ (`filter="reward"`), or its accuracy rewards do ("accuracy").
    Returns the rounds and whether the data ran out (`draw()` gave None)."""
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    rounds: list[Round] = []
    while True:
        out, metrics = sample(batch, len(rounds))
        values = out.accuracy if filter == "accuracy" else out.scores.total
        rounds.append(Round(batch, out, signal_groups(values, group_size), metrics))
        if sum(int(r.signal.sum()) for r in rounds) >= batch_size or len(rounds) >= max_rounds:
            return rounds, False
        batch = draw()
        if batch is None:
            return rounds, True


def check_short(selection: Selection, cfg: DynamicSampling, key: str, batch_size: int, exhausted: bool) -> None:
    """A short batch: ShortBatchError (on_short="error") or a warning (on_short="fill")."""
    if not selection.short:
        return
    why = (
        f"the stage's data ran out after {selection.rounds} sampled batches"
        if exhausted
        else f"after config.{key}.max_rounds = {cfg.max_rounds} sampled batches"
    )
    equal = {"reward": "rewards", "accuracy": "accuracies"}[cfg.filter]
    if cfg.on_short == "error":
        raise ShortBatchError(
            f"config.{key}: {why}, only {selection.kept} of batch_size = {batch_size} groups had {equal} that differ "
            f"({selection.dropped} of {selection.sampled} groups sampled had equal {equal}); raise "
            f"config.{key}.max_rounds or set config.{key}.on_short='fill'"
        )
    logging.warning(
        "config.%s: %s, only %d of %d groups had %s that differ; the batch is filled with %d groups of equal %s%s",
        key,
        why,
        selection.kept,
        batch_size,
        equal,
        selection.filled,
        equal,
        " (advantage 0: no policy gradient)" if cfg.filter == "reward" else "",
    )
