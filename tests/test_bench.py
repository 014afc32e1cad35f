"""The benchmark harness (`python -m jaxvlm.bench`): FLOP counts, the hardware table, the interleaving of the
sides' timed repeats, and a smoke run of every section on the tiny config of each family (Qwen2.5-VL, Qwen3-VL) in
which the JAX side and the PyTorch baseline must do the same work."""

import importlib.util
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from jaxvlm import configuration, models, runtime, train_steps
from jaxvlm.bench import flops, hardware, run, workload
from jaxvlm.models import lora
from jaxvlm.models.config import DEFAULT_LORA_TARGETS, LoraConfig

_spec = importlib.util.spec_from_file_location(
    "bench_config", os.path.join(os.path.dirname(__file__), "..", "configs", "bench.py")
)
bench_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_config)


# ------------------------------------------------------------------------------------------------------------
# FLOP counts
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,image_hw,rows",
    [
        ("tiny", (56, 56), 1),
        ("small", (112, 112), 1),
        ("small", None, 3),
        ("qwen3_vl_tiny", (64, 64), 1),
        ("qwen3_vl_tiny", (128, 96), 1),
    ],
)
def test_analytic_forward_flops_match_the_traced_matmuls(preset, image_hw, rows):
    """The analytic count equals the matmuls the model's jaxpr executes (layer scans unrolled by the counter), where
    the implementation's attention is exactly the model's (one image, no window smaller than it). Qwen3-VL: the
    two-matrix vision MLP, every block full attention, the DeepStack mergers."""
    cfg = models.preset(preset)
    model = models.build_model(cfg)
    batch = workload.make_rows(cfg, rows, 96, 16, image_hw)
    mb = jax.tree.map(lambda x: x[0], workload.sft_microbatches(cfg, batch, 1))
    traced = flops.traced_matmul_flops(
        lambda p, b: train_steps.completion_logprobs(model, p, b), models.abstract_params(cfg), mb
    )
    analytic = flops.lm_forward_flops(cfg.text, [96] * rows, 16 * rows)
    if image_hw:
        analytic += flops.vision_forward_flops(cfg.vision, batch.image_grid_thw)
    assert analytic == pytest.approx(traced, rel=1e-9)
    assert flops.train_flops(cfg, [96] * rows, 16 * rows, batch.image_grid_thw)["total"] == pytest.approx(3 * traced)


@pytest.mark.parametrize(
    "preset,image_hw,targets",
    [
        ("tiny", (56, 56), DEFAULT_LORA_TARGETS),
        ("qwen3_vl_tiny", (64, 64), DEFAULT_LORA_TARGETS),
        ("tiny", (56, 56), (r"self_attn/(q_proj|v_proj)$",)),  # PEFT's classic pair: the backward still spans it all
    ],
)
def test_lora_flops_match_the_traced_adapter_gradient(preset, image_hw, targets):
    """A LoRA step forms no weight gradient of the frozen base: the analytic count (2 x the decoder's projections,
    MLPs and LM head, 3 x attention and the adapters, the vision tower's forward alone) equals the matmuls of the
    adapters' gradient as XLA keeps them (dead code dropped: the fused layers' custom VJPs also form the kernels'
    gradients, which nothing reads), less the QK^T that the attention's backward recomputes (half its forward)."""
    cfg = models.preset(preset, lora=LoraConfig(rank=4, targets=targets))
    model = models.build_model(cfg)
    rows = workload.make_rows(cfg, 2, 96, 16, image_hw)
    mb = jax.tree.map(lambda x: x[0], workload.sft_microbatches(cfg, rows, 1))
    params = models.abstract_params(cfg)
    seq_lens, scored = [96] * 2, 2 * 16
    count = flops.lora_train_flops(cfg, params, seq_lens, scored, rows.image_grid_thw)
    traced = flops.traced_matmul_flops(lambda p, b: run._adapter_gradient(model, p, b), params, mb, dead_code=False)
    attention = flops._lm_forward_parts(cfg.text, seq_lens, scored)[2]
    assert count["total"] + attention / 2 == pytest.approx(traced, rel=1e-9)
    # The adapters' own matmuls, by hand: tokens x 2 r (in + out) per adapted layer, 3 x for the backward.
    text, r = cfg.text, 4
    hd = text.resolved_head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    h, i = text.hidden_size, text.intermediate_size
    shapes = {
        "self_attn/q_proj": (h, q),
        "self_attn/k_proj": (h, kv),
        "self_attn/v_proj": (h, kv),
        "self_attn/o_proj": (q, h),
        "mlp/gate_proj": (h, i),
        "mlp/up_proj": (h, i),
        "mlp/down_proj": (i, h),
    }
    adapted = [x for name, x in shapes.items() if any(re.search(t, "language_model/layers/" + name) for t in targets)]
    assert len(adapted) == (2 if len(targets[0]) < 30 else 7)
    assert count["adapters"] == 3 * 192 * 2 * r * sum(a + b for a, b in adapted) * text.num_hidden_layers
    assert count["vision"] == flops.vision_forward_flops(cfg.vision, rows.image_grid_thw)  # forward only
    full = flops.train_flops(cfg, seq_lens, scored, rows.image_grid_thw)
    assert count["total"] < 0.8 * full["total"]
    # Without dead-code elimination the jaxpr holds the base kernels' gradients as well.
    assert flops.traced_matmul_flops(lambda p, b: run._adapter_gradient(model, p, b), params, mb) > traced


def test_window_attention_counts_windows_not_the_whole_image():
    """A 224 px image in the `small` preset has 2x2 windows of 112 px: windowed blocks attend 4 x 64^2 pairs, the
    full-attention block 256^2."""
    v = models.preset("small").vision
    windows, frames = flops._vision_segments([1, 16, 16], v)
    assert windows == [64, 64, 64, 64] and frames == [256]
    # Edge windows are smaller: 16 x 12 patches -> 8 x 6 merged tokens -> windows of 4x4 and 4x2 merged tokens.
    windows, _ = flops._vision_segments([1, 16, 12], v)
    assert sorted(windows) == [32, 32, 64, 64]


def test_verl_formula_and_3b_roofline_anchors():
    """verl's Qwen2 count by hand for one row; the decode roofline by hand for Qwen2.5-VL-3B."""
    t = models.preset("qwen2_5_vl_3b").text
    s = 1000
    n = (3 * 2048 * 11008 + 2048 * (2048 + 2 * 256 + 2048)) * 36 + 2 * 151936 * 2048
    assert flops.verl_lm_flops(t, [s]) == 6 * n * s + 12 * s * s * 128 * 16 * 36
    cfg = models.preset("qwen2_5_vl_3b")
    assert flops.kv_bytes_per_token(t, 2) == 36_864
    weights = flops.decoder_weight_bytes(cfg, 2)
    assert weights == pytest.approx(3.086e9 * 2, rel=0.01)  # 3.086 B LM params x 2 bytes
    roof = flops.decode_roofline(cfg, 1, 0, 3.35e12, 2, 2)
    assert roof["tokens_per_s"] == pytest.approx(543, rel=0.01)
    # B = 256, mean context 1,000: 9.4 GB of KV + 6.2 GB of weights per step -> <= 215 steps/s
    assert flops.decode_roofline(cfg, 256, 1000, 3.35e12, 2, 2)["steps_per_s"] == pytest.approx(215, rel=0.01)


def test_mfu_is_nan_without_a_peak_or_time():
    assert flops.mfu(1e12, 1.0, 1e13) == pytest.approx(0.1)
    assert math.isnan(flops.mfu(1e12, 0.0, 1e13)) and math.isnan(flops.mfu(1e12, 1.0, float("nan")))


def test_gpu_table():
    assert hardware.gpu_spec("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert hardware.gpu_spec("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert hardware.gpu_spec("NVIDIA H200") == (989e12, 4.8e12)
    assert hardware.gpu_spec("cpu") is None


def test_measured_matmul_peak_is_a_rate():
    peak = hardware.measured_matmul_peak("float32", size=256, repeats=2)
    assert np.isfinite(peak) and peak > 1e6


def test_rows_reject_what_does_not_fit():
    cfg = models.preset("tiny")
    with pytest.raises(ValueError, match="multiples of"):
        workload.make_rows(cfg, 2, 64, 8, (50, 56))
    with pytest.raises(ValueError, match="completion_len"):
        workload.make_rows(cfg, 2, 16, 12, (56, 56))
    with pytest.raises(ValueError, match="= 32"):  # Qwen3-VL: 16 px patches, 2 x 2 merged
        workload.make_rows(models.preset("qwen3_vl_tiny"), 2, 64, 8, (56, 56))


@pytest.mark.parametrize(
    "preset,image_hw,patch_dim,low,high",
    [("tiny", (56, 84), 1176, -1.80, 2.15), ("qwen3_vl_tiny", (64, 96), 1536, -1.0, 1.0)],
)
def test_rows_pixels_come_from_the_familys_image_processor(preset, image_hw, patch_dim, low, high):
    """Each family's patch length, grid and normalisation (Qwen2.5-VL: CLIP's mean / std, about [-1.79, 2.15];
    Qwen3-VL: mean = std = 0.5, [-1, 1]); the same seed, the same rows."""
    cfg = models.preset(preset)
    rows = workload.make_rows(cfg, 3, 64, 8, image_hw, seed=1)
    grid = [1, image_hw[0] // cfg.vision.patch_size, image_hw[1] // cfg.vision.patch_size]
    assert rows.image_grid_thw.tolist() == [grid] * 3
    assert rows.pixel_values.shape == (3 * grid[1] * grid[2], patch_dim) and rows.pixel_values.dtype == np.float32
    assert low <= rows.pixel_values.min() < low + 0.1 and high - 0.1 < rows.pixel_values.max() <= high
    assert (rows.input_ids == cfg.image_token_id).sum() == 3 * grid[1] * grid[2] // cfg.vision.merge_unit
    again = workload.make_rows(cfg, 3, 64, 8, image_hw, seed=1)
    np.testing.assert_array_equal(again.pixel_values, rows.pixel_values)


def test_bench_config_variants():
    for variant in bench_config.VARIANTS:
        c = bench_config.get_config(variant)
        cfg = models.preset(c.model.preset)
        assert set(c.sections) <= set(run.SECTIONS)
        for section in (c.sft, c.grpo):  # every variant's images fit its family's patches
            workload.image_tokens(cfg, tuple(section.image_hw))
    with pytest.raises(ValueError, match="unknown variant"):
        bench_config.get_config("7b")
    # A Qwen3-VL variant is its Qwen2.5-VL counterpart with the images of the same patch grid.
    for qwen3, counterpart in (("qwen3_vl_100m", "100m"), ("qwen3_vl_4b", "3b")):
        a, b = bench_config.get_config(qwen3), bench_config.get_config(counterpart)
        assert a.model.preset == qwen3 and (a.sft.seq_len, a.grpo.prompts) == (b.sft.seq_len, b.grpo.prompts)
        for x, y in ((a.sft.image_hw, b.sft.image_hw), (a.grpo.image_hw, b.grpo.image_hw)):
            assert [side // 16 for side in x] == [side // 14 for side in y]


def test_bench_configs_take_lora_settings():
    """Every variant has `model.lora` (rank 0: off, the model without adapters); a rank on the command line gives
    the JAX side base + adapters, and `--config.sections=sft,grpo` reads as two sections."""
    for variant in bench_config.VARIANTS:
        c = bench_config.get_config(variant)
        assert c.model.lora.rank == 0 and configuration.resolve_model(c.model).overrides.get("lora") is None
    c = bench_config.get_config("100m")
    c.model.lora.rank = 16
    model, params = runtime.build_model(configuration.resolve_model(c.model), c.seed, abstract=True)
    assert model.config.lora == LoraConfig(rank=16, alpha=16.0)
    assert lora.num_adapter_params(params) > 0 and lora.has_adapters(params)
    assert run.section_names(("sft,grpo",)) == ("sft", "grpo") == run.section_names(("sft", "grpo"))


# ------------------------------------------------------------------------------------------------------------
# Interleaving, medians and spread, the load average
# ------------------------------------------------------------------------------------------------------------


class _Clock:
    """A fake `time.perf_counter`: it moves only when a fake side works, so every duration is known exactly."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _FakeSide:
    """Logs (side, "prepare" | "repeat", start time) of every call into a shared log; each call takes a set time."""

    def __init__(self, name, log, clock, prepare_s, repeat_s, fail=False):
        self.name, self.log, self.clock, self.fail = name, log, clock, fail
        self.prepare_s, self.repeat_s = prepare_s, list(repeat_s)

    def prepare(self):
        self.log.append((self.name, "prepare", self.clock.now))
        if self.fail:
            raise RuntimeError("no compiler here\nsecond line")
        self.clock.now += self.prepare_s

    def repeat(self):
        self.log.append((self.name, "repeat", self.clock.now))
        seconds = self.repeat_s.pop(0)
        self.clock.now += seconds
        return {"step_s": seconds, "half_s": seconds / 2}


def _assert_interleaved(timeline, sides, rounds):
    """Every side's prepare, in order, ends before the first timed call; then rounds of one call per side in order."""
    calls = [(e["side"], e["call"]) for e in timeline]
    assert calls == [(s, "prepare") for s in sides] + [(s, r) for r in range(rounds) for s in sides]
    assert all(a["end_s"] <= b["start_s"] for a, b in zip(timeline, timeline[1:]))  # one after the other


def test_interleave_prepares_every_side_then_alternates_round_by_round(monkeypatch):
    clock, log = _Clock(), []
    monkeypatch.setattr(run.time, "perf_counter", clock)
    sides = {name: _FakeSide(name, log, clock, prepare_s=10.0, repeat_s=[1.0] * 4) for name in ("A", "B", "C")}
    timed, timeline = run.interleave(sides, 4)
    # As the sides saw it: all the prepares (compile / warm-up), then A B C A B C ...
    assert [(name, kind) for name, kind, _ in log] == (
        [(n, "prepare") for n in "ABC"] + [(n, "repeat") for _ in range(4) for n in "ABC"]
    )
    starts = [t for _, _, t in log]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    first_timed = next(t for _, kind, t in log if kind == "repeat")
    assert all(t < first_timed for _, kind, t in log if kind == "prepare")
    # ... and as the harness recorded it (seconds from the first call's start)
    _assert_interleaved(timeline, "ABC", 4)
    assert timeline[0]["start_s"] == 0.0 and timeline[3]["start_s"] == 30.0  # after three 10 s prepares
    assert [e["start_s"] for e in timeline[3:6]] == [30.0, 31.0, 32.0]
    assert set(timed) == set("ABC")


def test_interleave_reports_medians_spread_and_compile_apart(monkeypatch):
    clock, log = _Clock(), []
    monkeypatch.setattr(run.time, "perf_counter", clock)
    sides = {
        "jax": _FakeSide("jax", log, clock, prepare_s=7.0, repeat_s=[3.0, 1.0, 2.0, 9.0, 2.5]),
        "torch": _FakeSide("torch", log, clock, prepare_s=0.5, repeat_s=[4.0, 4.0, 4.0, 4.0, 4.0]),
    }
    timed, _ = run.interleave(sides, 5)
    j = timed["jax"]
    assert j["step_s"] == 2.5 and j["half_s"] == 1.25  # medians, per phase
    assert j["timings"]["step_s"] == {"median": 2.5, "min": 1.0, "max": 9.0, "n": 5, "times": [3.0, 1.0, 2.0, 9.0, 2.5]}
    assert j["compile_s"] == 7.0 - 2.5  # the prepare less one median repeat
    assert timed["torch"]["timings"]["step_s"]["min"] == timed["torch"]["timings"]["step_s"]["max"] == 4.0


def test_interleave_leaves_out_an_optional_side_that_cannot_prepare(monkeypatch):
    clock, log = _Clock(), []
    monkeypatch.setattr(run.time, "perf_counter", clock)
    sides = {
        "jax": _FakeSide("jax", log, clock, 1.0, [1.0, 1.0]),
        "torch_compile": _FakeSide("torch_compile", log, clock, 1.0, [], fail=True),
        "torch": _FakeSide("torch", log, clock, 1.0, [1.0, 1.0]),
    }
    timed, timeline = run.interleave(sides, 2, optional=("torch_compile",))
    assert timed["torch_compile"] == {"error": "RuntimeError: no compiler here"}
    assert [(e["side"], e["call"]) for e in timeline] == [
        ("jax", "prepare"),
        ("torch", "prepare"),
        ("jax", 0),
        ("torch", 0),
        ("jax", 1),
        ("torch", 1),
    ]
    with pytest.raises(RuntimeError, match="no compiler"):  # a side that must run may not fail quietly
        run.interleave({"torch": _FakeSide("torch", [], clock, 1.0, [], fail=True)}, 1)
    with pytest.raises(ValueError, match="at least 1"):
        run.interleave(sides, 0)


def test_load_warning_only_above_the_cpu_count():
    assert len(hardware.load_average()) == 3
    assert hardware.load_warning([1.5, 9.0, 9.0], 2) is None
    assert hardware.load_warning([float("nan")] * 3, 2) is None
    warning = hardware.load_warning([3.1, 0.5, 0.5], 2)
    assert "3.10" in warning and "2 CPUs" in warning and "not trustworthy" in warning


def test_the_run_reads_the_load_at_start_and_end_and_warns(tmp_path, monkeypatch):
    """A run with no sections (cheap): the load average before and after, in bench.json and the table's header, and
    the warning when the 1-minute load at the start exceeds the CPU count."""
    loads = iter([[64.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    monkeypatch.setattr(hardware, "load_average", lambda: next(loads))
    c = _smoke_config()
    c.sections, c.torch.enabled = (), False
    results = run.run(c, str(tmp_path))
    cpus = results["machine"]["cpus"]
    assert results["load_average"] == {"start": [64.0, 3.0, 2.0], "end": [1.0, 2.0, 3.0], "cpus": cpus}
    on_disk = json.load(open(tmp_path / "bench.json"))
    assert on_disk["load_average"] == results["load_average"] and on_disk["load_warning"] == results["load_warning"]
    assert "min and max" in on_disk["spread"]
    text = run.table(results)
    assert "load average (1, 5, 15 min): 64.00 3.00 2.00 at the start, 1.00 2.00 3.00 at the end" in text
    assert f"WARNING: 1-minute load average 64.00 at the start exceeds the {cpus} CPUs" in text
    quiet = dict(results, load_average={"start": [0.0, 0.0, 0.0], "end": [0.0, 0.0, 0.0], "cpus": cpus})
    del quiet["load_warning"]
    assert "WARNING" not in run.table(quiet) and "load average" in run.table(quiet)


# ------------------------------------------------------------------------------------------------------------
# The harness, both sides
# ------------------------------------------------------------------------------------------------------------


SMOKE_IMAGE = {"tiny": (112, 112), "qwen3_vl_tiny": (128, 128)}


def _smoke_config(variant: str = "tiny"):
    c = bench_config.get_config(variant)
    # 112 px (Qwen3-VL: 128 px) images: 4 x 4 merged tokens, so M-RoPE's 3-D positions differ from 1-D ones (a
    # baseline placing the image on the wrong positions fails the parity checks).
    image = SMOKE_IMAGE[variant]
    c.sft.update(steps=2, batch_size=4, seq_len=64, completion_len=16, image_hw=image)
    c.grpo.update(steps=2, prompts=2, num_generations=4, prompt_len=32, max_new_tokens=8, image_hw=image)
    c.decode.update(batches=(1, 4), prompt_len=16, new_tokens=8, repeats=2)
    c.torch.compile = False  # inductor's compile takes minutes on 2 cores; BENCHMARKS.md reports it
    c.peak.matmul_size = 256
    c.mesh.shape = (1, 1, 1)  # one of the 8 simulated devices (the sharded steps have their own tests)
    return c


@pytest.fixture(scope="module", params=sorted(SMOKE_IMAGE))
def smoke(request, tmp_path_factory):
    """The smoke run of one family's tiny variant (transformers' Qwen2_5_VL / Qwen3VL ForConditionalGeneration on
    the torch side)."""
    workdir = tmp_path_factory.mktemp("bench")
    return run.run(_smoke_config(request.param), str(workdir)), workdir


@pytest.mark.slow
def test_both_sides_compute_the_same_sft_losses_step_by_step(smoke):
    """Same weights, same batch, same AdamW: the losses before each of the 3 updates agree (so the updates did too),
    and so do the first gradient norms."""
    results, _ = smoke
    sft = results["sft"]
    assert len(sft["jax"]["losses"]) == len(sft["torch"]["losses"]) == 3
    assert sft["jax"]["losses"][2] < sft["jax"]["losses"][0]  # the updates moved the loss
    assert max(sft["parity"]["loss_rel_diff"]) < 1e-4
    assert sft["parity"]["grad_norm_rel_diff"] < 1e-3


@pytest.mark.slow
def test_both_sides_compute_the_same_grpo_gradient_on_the_same_rollouts(smoke):
    results, _ = smoke
    parity = results["grpo"]["parity"]
    assert parity["jax_grad_norm"] > 0
    assert parity["logp_max_abs_diff"] < 1e-4  # transformers scores the JAX sampler's tokens as the sampler did
    assert parity["grad_norm_rel_diff"] < 1e-3
    assert parity["loss_abs_diff"] < 1e-4


@pytest.mark.slow
def test_the_report_has_every_section_and_is_written(smoke):
    results, workdir = smoke
    on_disk = json.load(open(workdir / "bench.json"))
    assert on_disk["sft"]["parity"] == results["sft"]["parity"]
    assert (
        results["model"]["preset"] in SMOKE_IMAGE
        and results["sft"]["image_hw"] == SMOKE_IMAGE[results["model"]["preset"]]
    )
    for side in ("jax", "torch"):
        assert results["sft"][side]["tokens_per_s"] > 0 and results["sft"][side]["step_s"] > 0
        assert 0 < results["sft"][side]["mfu"] < 1
        g = results["grpo"][side]
        assert g["decode_tokens_per_s"] > 0 and g["update_tokens_per_s"] > 0 and g["step_s"] > 0
    assert [r["batch"] for r in results["decode"]["rows"]] == [1, 4]
    assert all(r["torch"]["decode_tok_s"] > 0 for r in results["decode"]["rows"])
    assert all(r["roofline"]["tokens_per_s"] > 0 for r in results["decode"]["rows"])  # CPU: measured bandwidth
    text = run.table(results)
    for label in ("SFT step", "GRPO step", "Decode", "vs torch", "parity"):
        assert label in text


@pytest.mark.slow
def test_every_section_interleaves_the_sides_after_their_warm_up(smoke):
    """The timelines of the real run: in each section (and each decode batch size) every side compiles / warms up
    before the first timed repeat, then the sides alternate round by round."""
    results, _ = smoke
    c = _smoke_config()
    _assert_interleaved(results["sft"]["timeline"], ("jax", "torch"), c.sft.steps)
    _assert_interleaved(results["grpo"]["timeline"], ("jax", "torch"), c.grpo.steps)
    for r in results["decode"]["rows"]:
        _assert_interleaved(r["timeline"], ("jax", "torch"), c.decode.repeats)


@pytest.mark.slow
def test_figures_are_medians_with_their_spread(smoke):
    results, workdir = smoke
    on_disk = json.load(open(workdir / "bench.json"))
    c = _smoke_config()
    sft, grpo = results["sft"], results["grpo"]
    timed = [(sft[s], ("step_s",), c.sft.steps) for s in ("jax", "torch")]
    timed += [
        (grpo[s], ("prefill_s", "rollout_s", "reward_s", "update_s", "step_s"), c.grpo.steps) for s in ("jax", "torch")
    ]
    timed += [
        (r[s], ("prefill_s", "generate_s", "first_token_s", "decode_s"), c.decode.repeats)
        for r in results["decode"]["rows"]
        for s in ("jax", "torch")
    ]
    for side, keys, n in timed:
        for key in keys:
            t = side["timings"][key]
            assert t["n"] == len(t["times"]) == n
            assert t["min"] <= t["median"] <= t["max"] and side[key] == t["median"]
            assert t["median"] == pytest.approx(np.median(t["times"]))
        assert np.isfinite(side["compile_s"])
    assert on_disk["sft"]["jax"]["timings"] == sft["jax"]["timings"]
    # Ratios come from the medians.
    assert sft["jax"]["tokens_per_s"] == pytest.approx(sft["tokens"] / sft["jax"]["timings"]["step_s"]["median"])
    row = results["decode"]["rows"][0]
    # decode_s = generate(N) - generate(1): on a tiny model under load the difference can come out <= 0, which the
    # bench floors at 1e-9 s (decode.py) rather than dividing by it.
    decode_s = max(row["torch"]["timings"]["decode_s"]["median"], 1e-9)
    assert row["torch"]["decode_tok_s"] == pytest.approx(
        row["batch"] * (results["decode"]["new_tokens"] - 1) / decode_s
    )
    text = run.table(results)
    assert "min–max" in text and "medians" in text and f"{c.sft.steps} repeats per side" in text


@pytest.fixture(scope="module")
def lora_smoke(tmp_path_factory):
    """The tiny variant with LoRA (rank 4, alpha 12: scale 3, so a side applying another scale shows) on both sides,
    one timed repeat per section; decode on one batch size (the merged model)."""
    c = _smoke_config("tiny")
    c.model.lora.update(rank=4, alpha=12.0)
    c.sft.steps = c.grpo.steps = c.decode.repeats = 1
    c.decode.update(batches=(1,), new_tokens=4)
    workdir = tmp_path_factory.mktemp("bench_lora")
    return run.run(c, str(workdir)), workdir


# A bench run of its own with the torch side (~45 s on 2 cores): JAXVLM_FULL_TESTS=1. CI keeps the LoRA FLOP count,
# config and optimizer-state checks; the peft parity of the adapters themselves is tests/test_lora_peft.py's.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("JAXVLM_FULL_TESTS"), reason="full tier (JAXVLM_FULL_TESTS=1)")
def test_lora_runs_on_both_sides_with_the_same_adapters(lora_smoke):
    """jaxvlm's adapters and peft's (the same ones, written by lora.save_peft_adapter) train alike: SFT losses step by
    step and the first gradient norm, and the GRPO loss and gradient norm on the JAX sampler's rollouts, agree; both
    optimizers hold the adapters alone; bench.json and the table say LoRA."""
    results, workdir = lora_smoke
    m = results["model"]
    adapters = lora.num_adapter_params(models.abstract_params(models.preset("tiny", lora=LoraConfig(rank=4))))
    assert m["lora"] == {
        "rank": 4,
        "alpha": 12.0,
        "dropout": 0.0,
        "targets": list(DEFAULT_LORA_TARGETS),
        "adapted_layers": 7,
    }
    assert m["adapter_params"] == m["trainable_params"] == adapters > 0
    assert m["params"] == sum(x.size for x in jax.tree.leaves(models.abstract_params(models.preset("tiny"))))
    sft, grpo = results["sft"], results["grpo"]
    for section in (sft, grpo):
        assert section["trainable_params"] == {"jax": adapters, "torch": adapters}
        assert section["flops"]["adapters"] > 0  # flops.lora_train_flops (checked against the trace on its own)
    assert len(sft["jax"]["losses"]) == len(sft["torch"]["losses"]) == 2
    assert sft["jax"]["losses"][1] < sft["jax"]["losses"][0]  # the adapters moved the loss
    assert max(sft["parity"]["loss_rel_diff"]) < 1e-4 and sft["parity"]["grad_norm_rel_diff"] < 1e-3
    parity = grpo["parity"]
    assert parity["jax_grad_norm"] > 0 and parity["grad_norm_rel_diff"] < 1e-3
    assert parity["logp_max_abs_diff"] < 1e-4 and parity["loss_abs_diff"] < 1e-4
    assert results["decode"]["weights"].startswith("LoRA merged") and "B = 0" in results["decode"]["weights"]
    assert results["decode"]["rows"][0]["torch"]["decode_tok_s"] > 0
    assert "weights: LoRA merged into the base" in run.table(results)
    on_disk = json.load(open(workdir / "bench.json"))
    assert on_disk["model"] == m and on_disk["grpo"]["parity"] == parity
    text = run.table(results)
    assert "LoRA rank 4 alpha 12 dropout 0 on 7 linear layers" in text and "through peft" in text
    assert text.count(f"trained params jax {adapters / 1e6:,.2f}M, torch {adapters / 1e6:,.2f}M") == 2


@pytest.mark.slow
def test_the_parity_check_has_teeth(tmp_path):
    """A baseline that does different work (another learning rate) is caught by the step-by-step loss comparison."""
    from jaxvlm.bench import jax_side, torch_side

    c = _smoke_config()
    model, params = run._model(c)
    rows = workload.make_rows(model.config, 4, 64, 16, (56, 56))
    models.save_pretrained(model, params, str(tmp_path))
    j = jax_side.Sft(model, params, rows, micro_batches=1, opt=c.optimizer, mesh=jax_side.default_mesh((1, 1, 1)))
    c.optimizer.learning_rate *= 3
    t = torch_side.Sft(torch_side.TorchBaseline(str(tmp_path), "float32", c.optimizer), rows, micro_batches=1)
    run.interleave({"jax": j, "torch": t}, 1)
    assert len(j.losses) == len(t.losses) == 2
    assert run._rel(j.losses[0], t.losses[0]) < 1e-4  # same start
    assert run._rel(j.losses[1], t.losses[1]) > 1e-3  # different update


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["0.5b", "3b", "qwen3_vl_2b", "qwen3_vl_4b"])
def test_gpu_variants_trace_their_sft_step(variant):
    """The GPU sizes cannot run here; their SFT step must still build (shapes only: jax.eval_shape, no memory)."""
    import functools

    from jaxvlm.bench import jax_side

    c = bench_config.get_config(variant)
    cfg = models.preset(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
    model = models.build_model(cfg)
    rows = workload.make_rows(cfg, c.sft.batch_size, c.sft.seq_len, c.sft.completion_len, tuple(c.sft.image_hw))
    mb = workload.sft_microbatches(cfg, rows, c.sft.micro_batches)
    ocfg = jax_side._optimizer_config(c.optimizer)
    params = models.abstract_params(cfg)
    optimizer = train_steps.make_optimizer(ocfg, params)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, 0), params)
    step = functools.partial(
        train_steps.sft_step,
        model=model,
        optimizer=optimizer,
        schedule=train_steps.learning_rate_schedule(ocfg),
        cfg=train_steps.LossConfig(),
    )
    new_state, metrics = jax.eval_shape(step, state, mb)
    assert metrics["loss"].shape == () and jax.tree.structure(new_state) == jax.tree.structure(state)
