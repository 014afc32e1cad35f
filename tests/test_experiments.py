"""The comparisons harness (jaxvlm.experiments): equal sample budgets, valid configs, shared prefixes, the table."""

import os

import numpy as np
import pytest

from jaxvlm import experiments


@pytest.mark.parametrize("budget", sorted(experiments.BUDGETS))
@pytest.mark.parametrize("comparison", experiments.COMPARISONS)
def test_arms_of_a_comparison_draw_the_same_number_of_prompts(comparison, budget):
    b = experiments.BUDGETS[budget]
    arms = experiments.arms(comparison, b)
    assert len(arms) >= 2
    prompts = {name: experiments._prompts(stages, b) for name, stages in arms.items()}
    assert len(set(prompts.values())) == 1, prompts
    for stages in arms.values():
        experiments.arm_config(stages, b, seed=0)  # check_config passes


def test_arms_that_share_a_stage_name_share_its_config():
    """run_arm reuses a trained prefix by stage names, so one name must mean one stage everywhere."""
    seen = {}
    b = experiments.BUDGETS["quick"]
    for comparison in experiments.COMPARISONS:
        for stages in experiments.arms(comparison, b).values():
            for name, s in stages:
                seen.setdefault(name, s.to_json_best_effort())
                assert seen[name] == s.to_json_best_effort(), name


def test_the_comparisons_differ_only_where_they_should():
    b = experiments.BUDGETS["quick"]
    cl = experiments.arms("clgrpo", b)
    (a4, s4), (a3, s3) = [stages[-1] for stages in cl.values()]
    assert s4.loss.eps_low < s3.loss.eps_low and s4.loss.eps_high == s3.loss.eps_high
    assert s4.loss.num_iterations == s3.loss.num_iterations > 1  # the clip can bind
    dy = [stages[-1][1].loss.dyme_granularity for stages in experiments.arms("dyme", b).values()]
    assert dy == ["prompt", "batch"]
    cur = experiments.arms("curriculum", b)["curriculum yes/no -> choice -> open"]
    assert [tuple(s.data.sources[0]["tasks"]) for _, s in cur[1:]] == [("exists",), ("count_choice",), ("count",)]
    infi = experiments.arms("infi_mmr", b)["text -> caption -> caption-free"]
    assert [s.data.with_caption for _, s in infi[2:]] == [True, False]
    assert experiments.arms("infi_mmr", b)["caption-free only"][-1][1].data.with_caption is False


def test_table_and_plot(tmp_path):
    results = {
        "dyme": {
            arm: {
                str(seed): {"accuracy": acc + 0.01 * seed, "tasks": {"count": acc}, "prompts": 40} for seed in range(3)
            }
            for arm, acc in (("DyME prompt", 0.5), ("DyME batch", 0.25))
        }
    }
    text = experiments.table(results)
    assert "| DyME prompt | 3 | 40 | **0.510 ± 0.010** | 0.500 ± 0.000 |" in text
    assert "| DyME batch | 3 | 40 | **0.260 ± 0.010** |" in text
    experiments.plot(results, str(tmp_path / "r.png"), floor=0.55)
    assert open(tmp_path / "r.png", "rb").read(4) == b"\x89PNG"
    assert np.isclose(float(experiments._pm([1.0, 3.0]).split(" ± ")[1]), np.std([1.0, 3.0], ddof=1), atol=1e-3)
    assert not os.path.exists(tmp_path / "runs")


class FakeTrainer:
    """Stands in for jaxvlm.trainer.run: records which stages each call trains, writes the per-stage evaluations
    (and final_model) the way the trainer does, and can be told to stop ("SIGTERM") in a given stage once."""

    def __init__(self, stop_in=None):
        self.calls, self.stop_in = [], stop_in

    def __call__(self, config, workdir):
        from jaxvlm.metrics import MetricsWriter

        done = set()
        if os.path.exists(os.path.join(workdir, "done.txt")):
            done = set(open(os.path.join(workdir, "done.txt")).read().split())
        todo = [s for s in config.stage_order if s not in done]
        self.calls.append((os.path.basename(workdir), todo))
        os.makedirs(workdir, exist_ok=True)
        with MetricsWriter(workdir, tensorboard=False) as w:
            for i, name in enumerate(todo):
                if name == self.stop_in:
                    self.stop_in = None
                    return {"finished": False}
                w.write(
                    len(done) + i + 1,
                    {"accuracy": 0.1 * (len(done) + i + 1), "accuracy/task/count": 0.5, "stage": name},
                    prefix="eval/",
                )
                with open(os.path.join(workdir, "done.txt"), "a") as f:
                    f.write(name + "\n")
        os.makedirs(os.path.join(workdir, "final_model"), exist_ok=True)
        open(os.path.join(workdir, "final_model", "config.json"), "w").write("{}")
        return {"finished": True}


def test_run_arm_trains_shared_prefixes_once_and_resumes_an_interrupted_arm(tmp_path, monkeypatch):
    from jaxvlm import trainer

    fake = FakeTrainer(stop_in="cliplow")
    monkeypatch.setattr(trainer, "run", fake)
    b = experiments.BUDGETS["quick"]
    arms = experiments.arms("clgrpo", b)
    stages4, stages3 = arms["stage 4 ClipLow (eps_low 0.1)"], arms["stage 3 continued (eps_low 0.2)"]
    with pytest.raises(SystemExit, match="resumes it"):
        experiments.run_arm(str(tmp_path), stages4, b, seed=0)
    assert fake.calls == [("warmup", ["warmup"]), ("warmup+stage3", ["stage3"]), ("warmup+stage3+cliplow", ["cliplow"])]
    # The same command again: the interrupted arm continues in its own workdir, nothing before it is re-trained.
    result = experiments.run_arm(str(tmp_path), stages4, b, seed=0)
    assert fake.calls[3:] == [("warmup+stage3+cliplow", ["cliplow"])]
    assert [(s, step) for s, step, _ in result["stages"]] == [("warmup", 1), ("stage3", 2), ("cliplow", 3)]
    assert result["accuracy"] == pytest.approx(0.3)
    assert result["tasks"] == {"count": 0.5} and result["prompts"] == experiments._prompts(stages4, b)
    # The other arm shares warmup and stage3: only its own last stage is trained.
    experiments.run_arm(str(tmp_path), stages3, b, seed=0)
    assert fake.calls[4:] == [("warmup+stage3+stage3_more", ["stage3_more"])]
    assert not any(name.endswith(".copy") for name in os.listdir(tmp_path / "runs" / "seed0"))


def test_majority_answer_floor_counts_the_validation_answers():
    from collections import Counter

    from jaxvlm.data import gym

    b = experiments.BUDGETS["quick"]
    prior = experiments.majority_answer_accuracy(b)
    specs = gym.build_specs(
        "validation",
        b.eval_examples,
        gym.GymConfig(difficulties=experiments.DIFFICULTIES),
        tasks=experiments.VISUAL_TASKS,
    )
    exists = Counter(s.answer for s in specs if s.task == "exists")
    assert set(exists) == {"yes", "no"} and prior["exists"] == max(exists.values()) / sum(exists.values())
    assert prior["all"] == pytest.approx(sum(prior[t] for t in experiments.VISUAL_TASKS) / 3)  # equal task shares
    assert 0 < min(prior.values()) and max(prior.values()) < 1
