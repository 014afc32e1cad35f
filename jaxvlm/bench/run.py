"""The benchmark harness: jaxvlm and the PyTorch baseline side by side, on the same checkpoint and batches.

    python -m jaxvlm.bench --config configs/bench.py[:tiny|100m|0.5b|3b] --workdir /tmp/jaxvlm-bench

Sections (`config.sections`):
  sft     one SFT step (forward + backward + AdamW): step time, tokens/s, MFU counting the vision tower and
          LM-only as verl/EasyR1 count it, compile time apart; PyTorch eager and `torch.compile`
  grpo    one GRPO step end to end: rollout (prefill and decode tokens/s apart), host reward, update tokens/s,
          step time, tokens/s as EasyR1 reports it ((prompt + completion tokens) / step time / devices)
  decode  greedy decode throughput at several batch sizes (`jaxvlm.bench.decode`) and its memory-bandwidth
          roofline (weights + KV bytes read per step / bandwidth: a GPU's nominal HBM figure, else measured)
Before any timing the two sides must agree: SFT losses step by step on the same batch, and the GRPO loss and
gradient norm on the same rollout batch (the JAX sampler's rows scored by both); the harness records the
differences (`parity`), and the test suite asserts them on the tiny config.

Peak for MFU: on GPU the nominal dense bf16 FLOP/s of the device; elsewhere a jitted matmul measured in this run
(and the bandwidth a jitted sum over 512 MiB reaches).
Writes `<workdir>/bench.json` and prints the table (`table`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm import models, train_steps
from jaxvlm.bench import decode as decode_bench
from jaxvlm.bench import flops, hardware, jax_side, workload

SECTIONS = ("sft", "grpo", "decode")


def _model(c):
    cfg = models.preset(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
    return models.Qwen25VL(cfg), models.init_params(cfg, c.seed)


def _image_hw(value):
    return None if value is None or not len(value) else tuple(int(x) for x in value)


def _torch_baseline(c, checkpoint):
    from jaxvlm.bench.torch_side import TorchBaseline

    return TorchBaseline(checkpoint, c.model.dtype, c.optimizer)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def bench_sft(c, model, params, mesh, peak: dict, checkpoint: str | None) -> dict:
    s = c.sft
    rows = workload.make_rows(model.config, s.batch_size, s.seq_len, s.completion_len, _image_hw(s.image_hw), c.seed)
    tokens = rows.num_rows * rows.seq_len
    count = flops.train_flops(model.config, [rows.seq_len] * rows.num_rows, rows.num_rows * s.completion_len,
                              rows.image_grid_thw)
    verl = flops.verl_lm_flops(model.config.text, [rows.seq_len] * rows.num_rows)
    devices = mesh.devices.size  # the devices the step runs on

    def summary(r):
        return {**{k: v for k, v in r.items() if k != "step_times"}, "tokens_per_s": tokens / r["step_s"],
                "mfu": flops.mfu(count["total"], r["step_s"], peak["flops"] * devices),
                "mfu_lm_verl": flops.mfu(verl, r["step_s"], peak["flops"] * devices)}

    # What the step executes: the jaxpr's matmuls (x3 for the backward). Above the model count where the
    # implementation computes more than the model needs (e.g. masked attention over several images' patches).
    mb = workload.sft_microbatches(model.config, rows, s.micro_batches)
    one = jax.tree.map(lambda x: x[0], mb)
    executed = 3 * s.micro_batches * flops.traced_matmul_flops(
        lambda p, b: train_steps.completion_logprobs(model, p, b), params, one)
    out = {"rows": rows.num_rows, "seq_len": rows.seq_len, "completion_len": s.completion_len,
           "image_hw": _image_hw(s.image_hw), "tokens": tokens, "flops": count, "flops_lm_verl": verl,
           "executed_matmul_flops": executed}
    out["jax"] = summary(jax_side.sft(model, params, rows, micro_batches=s.micro_batches, steps=s.steps,
                                      opt=c.optimizer, mesh=mesh))
    if checkpoint:
        for variant, compiled in (("torch", False), ("torch_compile", True)):
            if compiled and not c.torch.compile:
                continue
            try:
                baseline = _torch_baseline(c, checkpoint)  # fresh weights: both sides start from the same params
                out[variant] = summary(baseline.sft(rows, micro_batches=s.micro_batches, steps=s.steps,
                                                    compile=compiled))
            except Exception as e:  # noqa: BLE001 - torch.compile may not work here; say so in the table
                if not compiled:
                    raise
                out[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        j, t = out["jax"], out["torch"]
        n = min(len(j["losses"]), len(t["losses"]))
        out["parity"] = {"loss_rel_diff": [_rel(a, b) for a, b in zip(j["losses"][:n], t["losses"][:n])],
                         "grad_norm_rel_diff": _rel(j["grad_norms"][0], t["grad_norms"][0])}
    return out


def bench_grpo(c, model, params, mesh, peak: dict, checkpoint: str | None) -> dict:
    s = c.grpo
    rows = workload.make_rows(model.config, s.prompts, s.prompt_len, 0, _image_hw(s.image_hw), c.seed + 1)
    g, n = s.num_generations, s.max_new_tokens
    completions = rows.num_rows * g
    seq_lens = [rows.seq_len + n] * completions
    update_flops = flops.train_flops(model.config, seq_lens, completions * n, workload.repeated_pixels(rows, g)[1])
    verl = flops.verl_lm_flops(model.config.text, seq_lens)
    devices = mesh.devices.size  # the devices the step runs on
    tokens = completions * (rows.seq_len + n)

    def summary(r):
        decode_s = max(r["rollout_s"] - r["prefill_s"], 1e-12)
        return {**{k: v for k, v in r.items() if k not in ("first_rows",)},
                "prefill_tokens_per_s": rows.num_rows * rows.seq_len / r["prefill_s"],
                "decode_tokens_per_s": completions * (n - 1) / decode_s,
                "update_tokens_per_s": tokens / r["update_s"],
                "tokens_per_s_per_device": tokens / r["step_s"] / devices,
                "update_mfu_lm_verl": flops.mfu(verl, r["update_s"], peak["flops"] * devices),
                "update_mfu": flops.mfu(update_flops["total"], r["update_s"], peak["flops"] * devices)}

    jax_result = jax_side.grpo(model, params, rows, num_generations=g, max_new_tokens=n,
                               micro_batches=s.micro_batches, steps=s.steps, opt=c.optimizer, mesh=mesh)
    out = {"prompts": rows.num_rows, "prompt_len": rows.seq_len, "num_generations": g, "max_new_tokens": n,
           "image_hw": _image_hw(s.image_hw), "tokens": tokens, "flops": update_flops, "flops_lm_verl": verl,
           "jax": summary(jax_result)}
    if checkpoint:
        baseline = _torch_baseline(c, checkpoint)
        # Parity first, on fresh weights: the JAX sampler's first batch, scored and differentiated by both.
        first = jax_result["first_rows"]
        ids = np.concatenate([first["prompt_ids"], first["completion_ids"]], axis=1)
        pixels, grid = workload.repeated_pixels(rows, g)
        import torch

        with torch.no_grad():  # the torch side's log-probs of the JAX sampler's tokens vs the sampler's own
            torch_logp = baseline.completion_logprobs(baseline.model, ids, pixels, grid, n).float().cpu().numpy()
        loss, norm = baseline.grpo_update(ids, pixels, grid, n, torch.as_tensor(first["advantages"]),
                                          s.micro_batches, old_logp=first["old_logp"])
        out["parity"] = {"logp_max_abs_diff": float(np.max(np.abs(torch_logp - first["old_logp"]))),
                         "jax_loss": jax_result["first_loss"], "torch_loss": loss,
                         "loss_abs_diff": abs(jax_result["first_loss"] - loss),
                         "jax_grad_norm": jax_result["first_grad_norm"], "torch_grad_norm": norm,
                         "grad_norm_rel_diff": _rel(jax_result["first_grad_norm"], norm)}
        out["torch"] = summary(baseline.grpo(rows, num_generations=g, max_new_tokens=n,
                                             micro_batches=s.micro_batches, steps=s.steps))
    return out


def bench_decode(c, model, params, peak: dict, checkpoint: str | None) -> dict:
    d = c.decode
    dtype = c.model.dtype
    # Decode reads weights in the compute dtype (what an inference engine holds), so the roofline is in that dtype.
    decode_params = jax.tree.map(lambda x: x.astype(dtype), params)
    bytes_per = jnp.dtype(dtype).itemsize
    out = {"prompt_len": d.prompt_len, "new_tokens": d.new_tokens, "dtype": dtype, "rows": []}
    for b in d.batches:
        batch = decode_bench._prompts(int(b), d.prompt_len, model.config.text.vocab_size)
        row = {"batch": int(b), "jax": decode_bench.bench_jax(model, decode_params, batch, d.new_tokens, d.repeats)}
        if checkpoint:
            row["torch"] = decode_bench.bench_torch(checkpoint, batch, d.new_tokens, d.repeats, dtype=dtype)
        if not np.isnan(peak["bandwidth"]):
            roof = flops.decode_roofline(model.config, int(b), d.prompt_len + d.new_tokens / 2, peak["bandwidth"],
                                         bytes_per, bytes_per)
            row["roofline"] = {**roof, "jax_fraction": row["jax"]["decode_tok_s"] / roof["tokens_per_s"]}
            if "torch" in row:
                row["roofline"]["torch_fraction"] = row["torch"]["decode_tok_s"] / roof["tokens_per_s"]
        out["rows"].append(row)
    return out


def run(c, workdir: str) -> dict:
    """Run the configured sections; write `<workdir>/bench.json`; return the results."""
    os.makedirs(workdir, exist_ok=True)
    unknown = set(c.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"config.sections: unknown {sorted(unknown)}; known: {SECTIONS}")
    model, params = _model(c)
    mesh = jax_side.default_mesh(c.mesh.shape)
    peak = hardware.peak(c.model.dtype, c.peak.matmul_size)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    n_vision = int(sum(x.size for x in jax.tree.leaves(params.get("visual", {}))))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": hardware.describe(), "peak": peak,
               "model": {"preset": c.model.preset, "params": n_params, "vision_params": n_vision,
                         "dtype": c.model.dtype, "param_dtype": c.model.param_dtype, "remat": c.model.remat},
               "config": c.to_dict()}
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
            models.save_pretrained(model, params, tmp)  # the torch side loads the very same weights
            checkpoint = tmp
        for section in c.sections:
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
    with open(os.path.join(workdir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    return results


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
    return "n/a" if v is None or np.isnan(v) else f"{100 * v:.1f}%"


def table(results: dict) -> str:
    """Side by side: JAX, PyTorch eager, torch.compile, and JAX's speed-up over each (higher = JAX faster)."""
    m, p, mod = results["machine"], results["peak"], results["model"]
    head = (f"jaxvlm bench {results['date']}: preset {mod['preset']} ({mod['params'] / 1e6:.1f}M params, "
            f"{mod['vision_params'] / 1e6:.1f}M vision), {mod['dtype']} compute / {mod['param_dtype']} weights, "
            f"{m['device_kind']} x{m['devices']} ({m['cpus']} CPUs), jax {m['jax']}"
            + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else "")
            + f"\npeak {p['flops'] / 1e9:,.1f} GFLOP/s ({p['source']})")
    if "torch_missing" in results:
        head += f"\n{results['torch_missing']}"
    head += f", memory bandwidth {p['bandwidth'] / 1e9:,.1f} GB/s"
    lines = [head, "", f"{'':38s}{'JAX':>12s}{'torch':>12s}{'compile':>12s}{'vs torch':>10s}{'vs compile':>11s}"]

    def row(label, j, t=None, tc=None, kind="value"):
        def cell(x):
            return _pct(x) if kind == "pct" else _fmt(x)

        def speedup(other):
            if j is None or other is None or isinstance(other, str) or kind in ("value", "pct"):
                return "-"
            return f"{(j / other if kind == 'rate' else other / j):.2f}x"

        lines.append(f"{label:38s}{cell(j):>12s}{cell(t):>12s}{cell(tc):>12s}{speedup(t):>10s}{speedup(tc):>11s}")

    def get(section, side, key):
        r = section.get(side)
        if not r or "error" in r:
            return None
        return r.get(key)

    if "sft" in results:
        s = results["sft"]
        lines.append(f"SFT step: {s['rows']} rows x {s['seq_len']} tokens ({s['completion_len']} scored), image "
                     f"{s['image_hw']}; {s['flops']['total'] / 1e9:,.1f} GFLOP ({s['flops']['vision'] / 1e9:,.1f} vision),"
                     f" executed matmuls {s['executed_matmul_flops'] / s['flops']['total']:.2f}x that")
        for label, key, kind in (("  step time (s)", "step_s", "time"), ("  tokens/s", "tokens_per_s", "rate"),
                                 ("  MFU (model incl. vision)", "mfu", "pct"),
                                 ("  MFU (LM only, verl's count)", "mfu_lm_verl", "pct"),
                                 ("  compile / warm-up (s)", "compile_s", "value")):
            row(label, get(s, "jax", key), get(s, "torch", key), get(s, "torch_compile", key), kind)
        if "error" in s.get("torch_compile", {}):
            lines.append(f"  torch.compile: {s['torch_compile']['error']}")
        if "parity" in s:
            lines.append(f"  parity: loss rel. diff per step {', '.join(f'{x:.1e}' for x in s['parity']['loss_rel_diff'])}"
                         f"; grad-norm rel. diff {s['parity']['grad_norm_rel_diff']:.1e}")
    if "grpo" in results:
        g = results["grpo"]
        lines.append(f"GRPO step: {g['prompts']} prompts x G {g['num_generations']}, prompt {g['prompt_len']} + "
                     f"{g['max_new_tokens']} new tokens, image {g['image_hw']}")
        for label, key, kind in (("  rollout prefill tokens/s", "prefill_tokens_per_s", "rate"),
                                 ("  rollout decode tokens/s", "decode_tokens_per_s", "rate"),
                                 ("  rollout (s)", "rollout_s", "time"), ("  update (s)", "update_s", "time"),
                                 ("  update tokens/s", "update_tokens_per_s", "rate"),
                                 ("  step time (s)", "step_s", "time"),
                                 ("  tokens/s per device (EasyR1's)", "tokens_per_s_per_device", "rate"),
                                 ("  update MFU (LM only, verl's)", "update_mfu_lm_verl", "pct")):
            row(label, get(g, "jax", key), get(g, "torch", key), None, kind)
        if "parity" in g:
            q = g["parity"]
            lines.append(f"  parity on the same rollouts: log-prob max abs diff {q['logp_max_abs_diff']:.1e}; loss "
                         f"{q['jax_loss']:.3g} vs {q['torch_loss']:.3g}; grad norm rel. diff {q['grad_norm_rel_diff']:.1e}")
    if "decode" in results:
        d = results["decode"]
        lines.append(f"Decode (greedy, {d['dtype']}, prompt {d['prompt_len']}, {d['new_tokens']} new tokens)")
        for r in d["rows"]:
            row(f"  batch {r['batch']:>3d} decode tokens/s", r["jax"]["decode_tok_s"],
                r.get("torch", {}).get("decode_tok_s"), None, "rate")
            if "roofline" in r:
                lines.append(f"  batch {r['batch']:>3d} bandwidth roofline {r['roofline']['tokens_per_s']:,.0f} tok/s:"
                             f" JAX at {_pct(r['roofline']['jax_fraction'])}"
                             + (f", torch at {_pct(r['roofline']['torch_fraction'])}"
                                if "torch_fraction" in r["roofline"] else ""))
    return "\n".join(lines)
