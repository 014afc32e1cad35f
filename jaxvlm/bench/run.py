"""The benchmark harness: jaxvlm and the PyTorch baseline side by side, on the same checkpoint and batches.

    python -m jaxvlm.bench --config configs/bench.py[:tiny|100m|0.5b|3b] --workdir /tmp/jaxvlm-bench

Sections (`config.sections`):
  sft     one SFT step (forward + backward + AdamW): step time, tokens/s, MFU counting the vision tower and
          LM-only as verl/EasyR1 count it, compile time apart; PyTorch eager and `torch.compile`
  grpo    one GRPO step end to end: rollout (prefill and decode tokens/s apart), host reward, update tokens/s,
          step time, tokens/s as EasyR1 reports it ((prompt + completion tokens) / step time / devices)
  decode  greedy decode throughput at several batch sizes (`jaxvlm.bench.decode`) and its memory-bandwidth
          roofline (weights + KV bytes read per step / bandwidth: a GPU's nominal HBM figure, else measured)

Every section times its sides with `interleave`: each side compiles and warms up first (`compile_s`, reported
apart), then the sides' timed repeats alternate round by round (JAX, torch, torch.compile, JAX, ...), so a change
in the machine's load hits every side alike. A figure is the median of a side's repeats (`sft.steps`,
`grpo.steps`, `decode.repeats` of them); `timings` holds each phase's min and max (the spread) and every repeat's
seconds; ratios are of medians. The machine's load average at the start and end of the run is in the table and in
`load_average`; a 1-minute load above the CPU count at the start gets a warning (`load_warning`).

Before any timing the two sides must agree: SFT losses step by step on the same batch, and the GRPO loss and
gradient norm on the same rollout batch (the JAX sampler's rows scored by both); the harness records the
differences (`parity`), and the test suite asserts them on the tiny config.

LoRA (`config.model.lora.rank > 0`): the JAX side trains jaxvlm's adapters, the PyTorch side the same adapters
(written with `lora.save_peft_adapter`, loaded with `peft.PeftModel.from_pretrained(..., is_trainable=True)`) on the
same base checkpoint, each optimizer over the adapters alone; the parity checks hold as without LoRA. The SFT / GRPO
FLOP counts are then `flops.lora_train_flops` (no weight gradients of the frozen base). The decode section decodes
the merged model on both sides (adapters folded into the kernels: what is served; fresh adapters have B = 0, so it is
the base model). `model` in bench.json gives the base's parameter count, the adapters' and the `lora` settings.

Peak for MFU: on GPU the nominal dense bf16 FLOP/s of the device; elsewhere a jitted matmul measured in this run
(and the bandwidth a jitted sum over 512 MiB reaches).
Writes `<workdir>/bench.json` and prints the table (`table`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import configuration, models, runtime, train_steps
from jaxvlm.bench import decode as decode_bench
from jaxvlm.bench import flops, hardware, jax_side, memory, workload
from jaxvlm.models import lora

SECTIONS = ("sft", "grpo", "decode")
SPREAD = "min and max over a side's timed repeats (medians are the figures; ratios are of medians)"


class Side(Protocol):
    """One contestant of a section (`jax_side`, `torch_side`, `decode`). It keeps its own state from call to call."""

    def prepare(self) -> None:
        """Compile and warm up: everything before the first timed repeat."""

    def repeat(self) -> dict[str, float]:
        """One timed repeat: seconds per phase, e.g. {"step_s": 0.02}."""


def interleave(sides: dict[str, Side], rounds: int, *, optional: tuple[str, ...] = ()) -> tuple[dict, list]:
    """Prepare every side in turn, then run `rounds` rounds of one timed repeat per side, in the order given:
    A B C A B C ... A load change on the machine then hits every side alike, where timing all of one side's repeats
    before the other's lets it favour one.

    Returns (per side its `_summary`, the timeline). A side in `optional` whose prepare raises gets {"error": ...}
    instead and sits the rounds out. The timeline has one {"side", "call" ("prepare" or the round), "start_s",
    "end_s"} per call, in call order, in seconds from the first call's start."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (a median of nothing), got {rounds}")
    timeline: list[dict] = []

    def call(name: str, what, fn):
        start = time.perf_counter()
        out = fn()
        end = time.perf_counter()
        timeline.append({"side": name, "call": what, "start_s": start, "end_s": end})
        return out, end - start

    warmup_s, errors = {}, {}
    for name, side in sides.items():
        try:
            _, warmup_s[name] = call(name, "prepare", side.prepare)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile may not work here; say so in the table
            if name not in optional:
                raise
            errors[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    repeats: dict[str, list] = {name: [] for name in warmup_s}
    for r in range(rounds):
        for name in repeats:
            repeats[name].append(call(name, r, sides[name].repeat))
    t0 = timeline[0]["start_s"] if timeline else 0.0
    for entry in timeline:
        entry["start_s"] -= t0
        entry["end_s"] -= t0
    return {name: errors.get(name) or _summary(warmup_s[name], repeats[name]) for name in sides}, timeline


def _summary(warmup_s: float, repeats: list[tuple[dict[str, float], float]]) -> dict:
    """A side's figures from its (phases, wall seconds) per repeat: each phase's median; `timings`: per phase the
    median, min, max (the spread), count and every repeat's seconds; `compile_s`: its prepare's seconds less one
    median repeat (what compiling and warming up cost beyond a steady-state repeat)."""
    phases = {key: [p[key] for p, _ in repeats] for key in repeats[0][0]}
    return {
        **{key: statistics.median(v) for key, v in phases.items()},
        "compile_s": warmup_s - statistics.median(wall for _, wall in repeats),
        "timings": {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "times": v}
            for key, v in phases.items()
        },
    }


def _model(c):
    return runtime.build_model(configuration.resolve_model(c.model), c.seed)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What the PyTorch side loads: `model`, the base weights (transformers' format); `adapter`, the PEFT directory of
    the JAX side's LoRA adapters (None without LoRA); `merged`, the weights with the adapters folded in (the decode
    section's: `model` itself without adapters or while they are zero)."""

    model: str
    adapter: str | None
    merged: str


def write_checkpoint(model, params, directory: str) -> Checkpoint:
    """The JAX side's very weights for the PyTorch side, under `directory`."""
    base = os.path.join(directory, "model")
    models.save_pretrained(model, lora.without_adapters(params), base)
    if not lora.has_adapters(params):
        return Checkpoint(base, None, base)
    adapter = os.path.join(directory, "adapter")
    lora.save_peft_adapter(model.config, params, adapter)
    merged = base
    if not lora.adapters_are_zero(params):  # e.g. adapters read from config.model.lora.path
        merged = os.path.join(directory, "merged")
        models.save_pretrained(model, params, merged)  # folds them in
    return Checkpoint(base, adapter, merged)


def _torch_baseline(c, checkpoint: Checkpoint):
    from jaxvlm.bench.torch_side import TorchBaseline

    return TorchBaseline(checkpoint.model, c.model.dtype, c.optimizer, adapter=checkpoint.adapter)


def _train_flops(model, params, seq_lens, scored_tokens, grids) -> dict:
    """The training step's model FLOPs: `flops.lora_train_flops` with adapters, else `flops.train_flops`."""
    if lora.has_adapters(params):
        return flops.lora_train_flops(model.config, params, seq_lens, scored_tokens, grids)
    return flops.train_flops(model.config, seq_lens, scored_tokens, grids)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def bench_sft(c, model, params, mesh, peak: dict, checkpoint: Checkpoint | None) -> dict:
    s = c.sft
    rows = workload.make_rows(
        model.config, s.batch_size, s.seq_len, s.completion_len, workload.image_hw(s.image_hw), c.seed
    )
    tokens = rows.num_rows * rows.seq_len
    count = _train_flops(
        model, params, [rows.seq_len] * rows.num_rows, rows.num_rows * s.completion_len, rows.image_grid_thw
    )
    verl = flops.verl_lm_flops(model.config.text, [rows.seq_len] * rows.num_rows)
    devices = mesh.devices.size  # the devices the step runs on

    def summary(r, side):
        return {
            **r,
            "losses": side.losses,
            "grad_norms": side.grad_norms,
            "tokens_per_s": tokens / r["step_s"],
            "mfu": flops.mfu(count["total"], r["step_s"], peak["flops"] * devices),
            "mfu_lm_verl": flops.mfu(verl, r["step_s"], peak["flops"] * devices),
        }

    # What the step executes: the jaxpr's matmuls (x3 for the backward; with LoRA, the gradient's own jaxpr, what
    # XLA keeps of it: no weight gradients of the frozen base). Above the model count where the implementation
    # computes more than the model needs (e.g. padded windows, recomputation in a backward), below where it skips
    # work (causal attention blocks above the diagonal). None when a loop's trip count is data-dependent (the
    # blockwise attention's causal loops over more than one block).
    mb = workload.sft_microbatches(model.config, rows, s.micro_batches)
    one = jax.tree.map(lambda x: x[0], mb)
    try:
        if lora.has_adapters(params):
            executed = s.micro_batches * flops.traced_matmul_flops(
                lambda p, b: _adapter_gradient(model, p, b), params, one, dead_code=False
            )
        else:
            executed = (
                3
                * s.micro_batches
                * flops.traced_matmul_flops(lambda p, b: train_steps.completion_logprobs(model, p, b), params, one)
            )
    except flops.DynamicLoopError:
        executed = None
    out = {
        "rows": rows.num_rows,
        "seq_len": rows.seq_len,
        "completion_len": s.completion_len,
        "image_hw": workload.image_hw(s.image_hw),
        "tokens": tokens,
        "flops": count,
        "flops_lm_verl": verl,
        "executed_matmul_flops": executed,
        "repeats": s.steps,
    }
    sides = {"jax": jax_side.Sft(model, params, rows, micro_batches=s.micro_batches, opt=c.optimizer, mesh=mesh)}
    if checkpoint:
        from jaxvlm.bench import torch_side

        # Fresh weights for each: every side starts from the same params and runs its own sequence of steps.
        sides["torch"] = torch_side.Sft(_torch_baseline(c, checkpoint), rows, micro_batches=s.micro_batches)
        if c.torch.compile:
            sides["torch_compile"] = torch_side.Sft(
                _torch_baseline(c, checkpoint), rows, micro_batches=s.micro_batches, compile=True
            )
    out["trainable_params"] = _trainable_params(sides)
    timed, out["timeline"] = interleave(sides, s.steps, optional=("torch_compile",))
    for name, side in sides.items():
        out[name] = timed[name] if "error" in timed[name] else summary(timed[name], side)
    if checkpoint:
        j, t = out["jax"], out["torch"]
        n = min(len(j["losses"]), len(t["losses"]))
        out["parity"] = {
            "loss_rel_diff": [_rel(a, b) for a, b in zip(j["losses"][:n], t["losses"][:n])],
            "grad_norm_rel_diff": _rel(j["grad_norms"][0], t["grad_norms"][0]),
        }
    return out


def _adapter_gradient(model, params, batch):
    """The LoRA adapters' gradient of the completion log-probs (what a LoRA step differentiates)."""
    trainable, frozen = lora.split_trainable(params)
    return jax.grad(lambda t: train_steps.completion_logprobs(model, lora.join(t, frozen), batch).sum())(trainable)


def _trainable_params(sides: dict) -> dict:
    """Parameters each side's optimizer updates, read from the sides' own state: the JAX side's train state (its
    adapters with LoRA) and the PyTorch side's parameters left trainable (peft's adapters with LoRA)."""
    out = {}
    for name, side in sides.items():
        if hasattr(side, "baseline"):
            out[name] = side.baseline.trainable_params
        else:
            out[name] = int(sum(x.size for x in jax.tree.leaves(lora.split_trainable(side.state.params)[0])))
    return out


def bench_grpo(c, model, params, mesh, peak: dict, checkpoint: Checkpoint | None) -> dict:
    s = c.grpo
    rows = workload.make_rows(model.config, s.prompts, s.prompt_len, 0, workload.image_hw(s.image_hw), c.seed + 1)
    g, n = s.num_generations, s.max_new_tokens
    completions = rows.num_rows * g
    seq_lens = [rows.seq_len + n] * completions
    update_flops = _train_flops(model, params, seq_lens, completions * n, workload.repeated_pixels(rows, g)[1])
    verl = flops.verl_lm_flops(model.config.text, seq_lens)
    devices = mesh.devices.size  # the devices the step runs on
    tokens = completions * (rows.seq_len + n)

    def summary(r):
        decode_s = max(r["rollout_s"] - r["prefill_s"], 1e-12)
        return {
            **r,
            "prefill_tokens_per_s": rows.num_rows * rows.seq_len / r["prefill_s"],
            "decode_tokens_per_s": completions * (n - 1) / decode_s,
            "update_tokens_per_s": tokens / r["update_s"],
            "tokens_per_s_per_device": tokens / r["step_s"] / devices,
            "update_mfu_lm_verl": flops.mfu(verl, r["update_s"], peak["flops"] * devices),
            "update_mfu": flops.mfu(update_flops["total"], r["update_s"], peak["flops"] * devices),
        }

    out = {
        "prompts": rows.num_rows,
        "prompt_len": rows.seq_len,
        "num_generations": g,
        "max_new_tokens": n,
        "image_hw": workload.image_hw(s.image_hw),
        "tokens": tokens,
        "flops": update_flops,
        "flops_lm_verl": verl,
        "repeats": s.steps,
    }
    kw = dict(num_generations=g, max_new_tokens=n, micro_batches=s.micro_batches)
    jax_grpo = jax_side.Grpo(model, params, rows, opt=c.optimizer, mesh=mesh, **kw)
    sides = {"jax": jax_grpo}
    if checkpoint:
        from jaxvlm.bench import torch_side

        # Parity first, on fresh weights (the torch side's prepare, after the JAX side's first step): the JAX
        # sampler's first batch, scored and differentiated by both.
        sides["torch"] = torch_side.Grpo(
            _torch_baseline(c, checkpoint), rows, parity_batch=lambda: jax_grpo.first["rows"], **kw
        )
    out["trainable_params"] = _trainable_params(sides)
    timed, out["timeline"] = interleave(sides, s.steps)
    for name in sides:
        out[name] = summary(timed[name])
    first = jax_grpo.first
    out["jax"].update(first_loss=first["loss"], first_grad_norm=first["grad_norm"])
    if checkpoint:
        q = sides["torch"].parity
        out["parity"] = {
            "logp_max_abs_diff": float(np.max(np.abs(q["logp"] - first["rows"]["old_logp"]))),
            "jax_loss": first["loss"],
            "torch_loss": q["loss"],
            "loss_abs_diff": abs(first["loss"] - q["loss"]),
            "jax_grad_norm": first["grad_norm"],
            "torch_grad_norm": q["grad_norm"],
            "grad_norm_rel_diff": _rel(first["grad_norm"], q["grad_norm"]),
        }
    return out


def bench_decode(c, model, params, peak: dict, checkpoint: Checkpoint | None) -> dict:
    d = c.decode
    dtype = c.model.dtype
    out = {"prompt_len": d.prompt_len, "new_tokens": d.new_tokens, "dtype": dtype, "repeats": d.repeats, "rows": []}
    if lora.has_adapters(params):
        # Both sides decode the merged model (what is served): the JAX side folds the adapters into the kernels of
        # a model without LoRA, the PyTorch side loads the merged checkpoint (the base itself while B = 0).
        zero = lora.adapters_are_zero(params)
        params = lora.merged(params, model.config.lora)
        model = models.build_model(model.config.replace(lora=None))
        out["weights"] = "LoRA merged into the base" + (" (fresh adapters, B = 0: the base model)" if zero else "")
    # Decode reads weights in the compute dtype (what an inference engine holds), so the roofline is in that dtype.
    decode_params = jax.tree.map(lambda x: x.astype(dtype), params)
    bytes_per = jnp.dtype(dtype).itemsize
    torch_model = decode_bench.load_torch(checkpoint.merged, dtype) if checkpoint else None
    for b in d.batches:
        batch = decode_bench._prompts(int(b), d.prompt_len, model.config.text.vocab_size)
        sides = {"jax": decode_bench.JaxGenerate(model, decode_params, batch, d.new_tokens)}
        if torch_model is not None:
            sides["torch"] = decode_bench.TorchGenerate(torch_model, batch, d.new_tokens)
        timed, timeline = interleave(sides, d.repeats)
        row = {
            "batch": int(b),
            **{name: {**r, **decode_bench.throughput(batch, d.new_tokens, r)} for name, r in timed.items()},
        }
        if not np.isnan(peak["bandwidth"]):
            roof = flops.decode_roofline(
                model.config, int(b), d.prompt_len + d.new_tokens / 2, peak["bandwidth"], bytes_per, bytes_per
            )
            row["roofline"] = {**roof, "jax_fraction": row["jax"]["decode_tok_s"] / roof["tokens_per_s"]}
            if "torch" in row:
                row["roofline"]["torch_fraction"] = row["torch"]["decode_tok_s"] / roof["tokens_per_s"]
        row["timeline"] = timeline
        out["rows"].append(row)
    return out


def run(c, workdir: str) -> dict:
    """Run the configured sections; write `<workdir>/bench.json`; return the results."""
    load_start = hardware.load_average()
    os.makedirs(workdir, exist_ok=True)
    sections = section_names(c.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"config.sections: unknown {sorted(unknown)}; known: {SECTIONS}")
    machine = hardware.describe()
    warning = hardware.load_warning(load_start, machine["cpus"])
    if warning:
        print(f"[bench] {warning}", flush=True)
    model, params = _model(c)
    mesh = jax_side.default_mesh(c.mesh.shape)
    peak = hardware.peak(c.model.dtype, c.peak.matmul_size)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "peak": peak,
        "load_average": {"start": load_start, "end": None, "cpus": machine["cpus"]},
        "spread": SPREAD,
        # params / vision_params: the base model's; adapter_params, trainable_params and the lora settings apart
        "model": memory.model_summary(c, params, model.config.lora),
        "config": c.to_dict(),
    }
    if warning:
        results["load_warning"] = warning
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        try:
            import torch
        except ImportError as e:  # e.g. a GPU machine with JAX only: the JAX side alone, and the table says so
            if c.torch.enabled:
                results["torch_missing"] = f"the PyTorch baseline did not run: {e}"
                print(f"[bench] {results['torch_missing']}", flush=True)
            torch = None
        if c.torch.enabled and torch is not None:
            results["machine"]["torch"] = torch.__version__
            results["machine"]["torch_threads"] = torch.get_num_threads()
            checkpoint = write_checkpoint(model, params, tmp)  # the torch side loads the very same weights
        for section in sections:
            print(f"[bench] {section}: running ({c.model.preset}, {c.model.dtype})", flush=True)
            t0 = time.perf_counter()
            if section == "sft":
                results["sft"] = bench_sft(c, model, params, mesh, peak, checkpoint)
            elif section == "grpo":
                results["grpo"] = bench_grpo(c, model, params, mesh, peak, checkpoint)
            else:
                results["decode"] = bench_decode(c, model, params, peak, checkpoint)
            results[section]["wall_s"] = time.perf_counter() - t0
            print(f"[bench] {section}: done in {results[section]['wall_s']:.0f} s", flush=True)
    results["load_average"]["end"] = hardware.load_average()
    with open(os.path.join(workdir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    return results


def section_names(value) -> tuple[str, ...]:
    """`config.sections` as names: a tuple, or what `--config.sections=sft,grpo` makes of it (the flag parser keeps
    "sft,grpo" as one entry)."""
    entries = [value] if isinstance(value, str) else list(value)
    return tuple(name.strip() for entry in entries for name in str(entry).split(",") if name.strip())


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if np.isnan(v):
        return "n/a"
    a = abs(v)
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _pct(v) -> str:
    if v is None:
        return "-"
    return "n/a" if np.isnan(v) else f"{100 * v:.1f}%"


def _load(values) -> str:
    return "n/a" if values is None else " ".join(f"{x:.2f}" for x in values)


VERL_LORA_NOTE = (
    "  LoRA: MFU (model) counts flops.lora_train_flops; verl's count assumes full fine-tuning (6 x params per token), "
    "so with LoRA it can pass 100%"
)


def _trainable_line(section: dict) -> str:
    """The parameters each side trains, when they are not every weight (LoRA)."""
    counts = section.get("trainable_params")
    if not counts or not section.get("flops", {}).get("adapters"):
        return ""
    return "; trained params " + ", ".join(f"{name} {n / 1e6:,.2f}M" for name, n in counts.items())


def table(results: dict) -> str:
    """Side by side: JAX, PyTorch eager, torch.compile, and JAX's speed-up over each (higher = JAX faster), from
    the medians of the sides' interleaved repeats; under each time, its spread (min–max over the repeats)."""
    m, p, mod, load = results["machine"], results["peak"], results["model"], results["load_average"]
    head = [
        f"jaxvlm bench {results['date']}: preset {mod['preset']} ({mod['params'] / 1e6:.1f}M params, "
        f"{mod['vision_params'] / 1e6:.1f}M vision), {mod['dtype']} compute / {mod['param_dtype']} weights, "
        f"{m['device_kind']} x{m['devices']} ({m['cpus']} CPUs), jax {m['jax']}"
        + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else ""),
        f"peak {p['flops'] / 1e9:,.1f} GFLOP/s ({p['source']}), memory bandwidth {p['bandwidth'] / 1e9:,.1f} GB/s",
        f"load average (1, 5, 15 min): {_load(load['start'])} at the start, {_load(load['end'])} at the end "
        f"({load['cpus']} CPUs)",
    ]
    if memory.lora_label(mod):
        head.append(memory.lora_label(mod) + " (the PyTorch side: the same adapters through peft)")
    if "load_warning" in results:
        head.append(results["load_warning"])
    if "torch_missing" in results:
        head.append(results["torch_missing"])
    head += [
        "Figures: medians of each side's timed repeats, which alternate between the sides round by round after",
        "every side's compile / warm-up; ratios are of medians; min–max: the fastest and slowest repeat.",
    ]
    w = 15
    lines = [*head, "", f"{'':38s}{'JAX':>{w}s}{'torch':>{w}s}{'compile':>{w}s}{'vs torch':>10s}{'vs compile':>11s}"]
    sides = ("jax", "torch", "torch_compile")

    def row(label, j, t=None, tc=None, kind="value"):
        def cell(x):
            return _pct(x) if kind == "pct" else _fmt(x)

        def speedup(other):
            if j is None or other is None or isinstance(other, str) or kind in ("value", "pct"):
                return "-"
            return f"{(j / other if kind == 'rate' else other / j):.2f}x"

        lines.append(f"{label:38s}{cell(j):>{w}s}{cell(t):>{w}s}{cell(tc):>{w}s}{speedup(t):>10s}{speedup(tc):>11s}")

    def spread(section, key):
        """The row under a median time: each side's fastest and slowest repeat."""
        cells = []
        for side in sides:
            t = (section.get(side) or {}).get("timings", {}).get(key)
            cells.append("-" if t is None else f"{_fmt(t['min'])}–{_fmt(t['max'])}")
        lines.append(f"{'      min–max':38s}" + "".join(f"{x:>{w}s}" for x in cells))

    def get(section, side, key):
        r = section.get(side)
        if not r or "error" in r:
            return None
        return r.get(key)

    if "sft" in results:
        s = results["sft"]
        lines.append(
            f"SFT step: {s['rows']} rows x {s['seq_len']} tokens ({s['completion_len']} scored), image "
            f"{s['image_hw']}; {s['flops']['total'] / 1e9:,.1f} GFLOP ({s['flops']['vision'] / 1e9:,.1f} vision),"
            + (
                ""
                if s["executed_matmul_flops"] is None
                else f" executed matmuls {s['executed_matmul_flops'] / s['flops']['total']:.2f}x that;"
            )
            + f" {s['repeats']} repeats per side"
            + _trainable_line(s)
        )
        for label, key, kind in (
            ("  step time (s)", "step_s", "time"),
            ("  tokens/s", "tokens_per_s", "rate"),
            ("  MFU (model incl. vision)", "mfu", "pct"),
            ("  MFU (LM only, verl's count)", "mfu_lm_verl", "pct"),
            ("  compile / warm-up (s)", "compile_s", "value"),
        ):
            row(label, *(get(s, side, key) for side in sides), kind)
            if key == "step_s":
                spread(s, key)
        if "error" in s.get("torch_compile", {}):
            lines.append(f"  torch.compile: {s['torch_compile']['error']}")
        if s["flops"].get("adapters"):
            lines.append(VERL_LORA_NOTE)
        if "parity" in s:
            diffs = s["parity"]["loss_rel_diff"]
            lines.append(
                f"  parity: loss rel. diff <= {max(diffs):.1e} over {len(diffs)} steps; grad-norm rel. diff "
                f"{s['parity']['grad_norm_rel_diff']:.1e}"
            )
    if "grpo" in results:
        g = results["grpo"]
        lines.append(
            f"GRPO step: {g['prompts']} prompts x G {g['num_generations']}, prompt {g['prompt_len']} + "
            f"{g['max_new_tokens']} new tokens, image {g['image_hw']}; {g['repeats']} repeats per side"
            + _trainable_line(g)
        )
        for label, key, kind in (
            ("  rollout prefill tokens/s", "prefill_tokens_per_s", "rate"),
            ("  rollout decode tokens/s", "decode_tokens_per_s", "rate"),
            ("  rollout (s)", "rollout_s", "time"),
            ("  update (s)", "update_s", "time"),
            ("  update tokens/s", "update_tokens_per_s", "rate"),
            ("  step time (s)", "step_s", "time"),
            ("  tokens/s per device (EasyR1's)", "tokens_per_s_per_device", "rate"),
            ("  update MFU (LM only, verl's)", "update_mfu_lm_verl", "pct"),
        ):
            row(label, get(g, "jax", key), get(g, "torch", key), None, kind)
            if kind == "time":
                spread(g, key)
        if g["flops"].get("adapters"):
            lines.append(VERL_LORA_NOTE)
        if "parity" in g:
            q = g["parity"]
            lines.append(
                f"  parity on the same rollouts: log-prob max abs diff {q['logp_max_abs_diff']:.1e}; loss "
                f"{q['jax_loss']:.3g} vs {q['torch_loss']:.3g}; grad norm rel. diff {q['grad_norm_rel_diff']:.1e}"
            )
    if "decode" in results:
        d = results["decode"]
        lines.append(
            f"Decode (greedy, {d['dtype']}, prompt {d['prompt_len']}, {d['new_tokens']} new tokens; "
            f"{d['repeats']} repeats per side)" + (f"; weights: {d['weights']}" if "weights" in d else "")
        )
        for r in d["rows"]:
            row(
                f"  batch {r['batch']:>3d} decode tokens/s",
                r["jax"]["decode_tok_s"],
                r.get("torch", {}).get("decode_tok_s"),
                None,
                "rate",
            )
            # (the spread of the timed generate itself: a repeat's decode time is a difference of two timings,
            # which load can make near zero or negative; the median of those differences is the figure above)
            row(
                f"    generate({d['new_tokens']}) (s)",
                get(r, "jax", "generate_s"),
                get(r, "torch", "generate_s"),
                None,
                "time",
            )
            spread(r, "generate_s")
            if "roofline" in r:
                lines.append(
                    f"  batch {r['batch']:>3d} bandwidth roofline {r['roofline']['tokens_per_s']:,.0f} tok/s:"
                    f" JAX at {_pct(r['roofline']['jax_fraction'])}"
                    + (
                        f", torch at {_pct(r['roofline']['torch_fraction'])}"
                        if "torch_fraction" in r["roofline"]
                        else ""
                    )
                )
    return "\n".join(lines)
