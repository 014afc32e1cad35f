"""Ahead-of-time memory report (MaxText style): compile the bench's steps for a device topology, allocate nothing.

    python -m jaxvlm.bench.memory --config configs/bench.py:3b --topology v5p:2x2x2 --mesh 1,8,1 --workdir W \
        [--sections sft,grpo,sampler] [--config.sft.micro_batches=1 ...]

`--topology` is a TPU topology (`v5p:2x2x2`, `v5e:2x4`, `v4:2x2x1`, ...: compiled by libtpu without a TPU,
`pip install -e '.[tpu]'`) or `cpu:N` (N simulated CPU devices). `--mesh` is (data, fsdp, tensor), one -1 allowed.

Sections, at the config's shapes, every argument abstract (`jax.ShapeDtypeStruct` carrying its sharding):
  sft      `train_steps.sft_step` on the bench's SFT batch (`workload.make_rows` + `workload.sft_microbatches`, `c.sft`)
  grpo     `train_steps.grpo_step` (leading axes [1, micro_batches]) on a rollout batch built as the bench's GRPO
           step builds it (jaxvlm/bench/jax_side.py: `sampling.update_rows` -> advantages ->
           `batching.microbatches`), from a synthetic host rollout of `c.grpo.prompts` x `num_generations` rows of
           `prompt_len + max_new_tokens` tokens
  sampler  the rollout sampler for the same prompts, G `num_generations`, `max_new_tokens`: `sampling.generate` run as
           the bench runs it, its host side for real (`prepare_prompts`, sampling settings, placements) and the
           jitted sampler it reaches (`sampling._generate_jit`) recorded instead of run
Batches come from the real host-side builders run on random numpy data (called as the bench calls them), their
shardings from `train_steps.jit_step` (and, for the sampler, `sampling.generate`'s placements); params and optimizer
state are `jax.eval_shape`s, so even the 3B model is never allocated.

Per section (per device): argument / output / aliased / temporary / generated-code bytes from
`compiled.memory_analysis()`, and the peak estimate argument + output - alias + temp (MaxText's formula;
generated code apart); the train state's share of the arguments from its shapes and shardings (`state_bytes`:
params, trainable params, AdamW's state; the sampler takes the params alone), so that with LoRA
(`--config.model.lora.rank=16`: adapters trained, the base frozen) the optimizer state is the adapters' two
moments; FLOPs and bytes accessed from `compiled.cost_analysis()` (XLA counts a while loop's body once: the layer
scan, the micro-batch and update scans run more often); lower and compile times; the 10 largest
buffers of XLA's buffer assignment (dumped by this compile alone: `xla_dump_to` as a compile option), with the
buffers live at the peak of the heap simulation, and, if no dump is found, the largest instruction results of the
optimized HLO instead (the report says which); the collectives of the optimized HLO with their static count, their
executions per step (x the trip counts of the loops around them: XLA's known trip count, else the bound in the
loop's condition, so the sampler's decode loop counts as running to max_new_tokens) and their largest operands.
A section that cannot be built (e.g. rows that the data-parallel devices cannot split) or does not compile
(e.g. out of memory) is reported with its message; the other sections still run.

Writes `<workdir>/memory.json` and prints the table (`table`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvlm.bench import hlo

SECTIONS = ("sft", "grpo", "sampler")
TRAINING_SECTIONS = ("sft", "grpo")  # the sections that take the whole train state (params + optimizer state)
PEAK_FORMULA = "argument + output - alias + temp (MaxText's estimate; generated code not included)"
GiB = 1024**3


class SetupError(Exception):
    """The whole command cannot run (bad topology or mesh, libtpu missing): one line, no traceback."""


class SectionError(Exception):
    """One section cannot be built or compiled; the message names the config key where there is one."""


# ----------------------------------------------------------------------------------------------------------
# Platform, topology and mesh
# ----------------------------------------------------------------------------------------------------------


def _parse_topology(topology: str) -> tuple[str, str]:
    kind, sep, spec = topology.partition(":")
    if not sep or not spec:
        raise SetupError(f"--topology {topology!r}: expected <tpu version>:<shape> (e.g. v5p:2x2x2, v5e:2x4) or cpu:N")
    return kind, spec


def _tpu_chips() -> int:
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - a private helper; assume no chips (this tool never uses them)
        return 0


def setup_platform(topology: str) -> None:
    """Process-wide settings for `topology`; call before anything starts a JAX backend (the CLI does).

    Computation that does run (host builders' few jnp ops, eval_shape) stays on the CPU backend. For a TPU topology
    libtpu only compiles: it may load next to other processes holding it (`ALLOW_MULTIPLE_LIBTPU_LOAD`; libtpu
    otherwise takes /tmp/libtpu_lockfile, so a second compile-only process, or one started while any plain JAX
    process on the machine holds libtpu, fails), and on a machine without TPU chips it is told it is one host
    (`TPU_WORKER_HOSTNAMES`, `TPU_HOST_BOUNDS`), which silences its hostname / host-bounds warnings and changes
    nothing in what it compiles (checked: same HLO and memory figures)."""
    kind, spec = _parse_topology(topology)
    jax.config.update("jax_platforms", "cpu")
    # Compile for real every time: a persistent-cache hit would skip the compile (no buffer dump, no compile time).
    jax.config.update("jax_enable_compilation_cache", False)
    if kind == "cpu":
        try:
            n = int(spec)
        except ValueError:
            raise SetupError(f"--topology {topology!r}: cpu:N needs a device count N") from None
        jax.config.update("jax_num_cpu_devices", n)
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if _tpu_chips() == 0:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def _libtpu_available() -> bool:
    if os.environ.get("TPU_LIBRARY_PATH") and os.path.isfile(os.environ["TPU_LIBRARY_PATH"]):
        return True
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def mesh_shape(shape: Sequence[int], devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 filled from `devices`; the product must be the device count."""
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise SetupError(f"--mesh {shape}: needs 3 entries (data, fsdp, tensor)")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise SetupError(f"--mesh {shape}: positive sizes, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if devices % known:
            raise SetupError(f"--mesh {shape}: {devices} devices are not a multiple of {known}")
        shape[shape.index(-1)] = devices // known
    if math.prod(shape) != devices:
        raise SetupError(f"--mesh {tuple(shape)} has {math.prod(shape)} devices; the topology has {devices}")
    return tuple(shape)


def make_mesh(topology: str, shape: Sequence[int]) -> tuple[Mesh, dict]:
    """The ("data", "fsdp", "tensor") mesh of `topology` and a description of it (after `setup_platform`)."""
    from jaxvlm import sharding

    kind, spec = _parse_topology(topology)
    if kind == "cpu":
        devices = jax.devices()
        if devices[0].platform != "cpu" or len(devices) != int(spec):
            raise SetupError(
                f"--topology {topology}: the process has {len(devices)} {devices[0].platform} devices "
                "(call setup_platform before JAX starts)"
            )
        mesh = sharding.make_mesh(mesh_shape(shape, len(devices)), devices)
    else:
        if not _libtpu_available():
            raise SetupError(
                f"--topology {topology} compiles for TPU with libtpu, which is not installed: "
                "pip install -e '.[tpu]' (libtpu==0.0.42.*, the version jax 0.10.2 pins)"
            )
        from jax.experimental import topologies

        try:
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
        except Exception as e:  # noqa: BLE001 - libtpu's message, on one line
            raise SetupError(f"--topology {topology}: libtpu cannot describe it: {_first_line(e)}") from None
        devices = list(topo.devices)
        dims = mesh_shape(shape, len(devices))
        try:
            mesh = topologies.make_mesh(topo, dims, sharding.MESH_AXES)
        except AssertionError:
            # e.g. v4 topologies list both cores of a chip (no megacore): jax's physical mesh builder refuses them,
            # so take the devices in their listed order.
            mesh = Mesh(np.asarray(devices, dtype=object).reshape(dims), sharding.MESH_AXES)
    d = mesh.devices.flat[0]
    return mesh, {
        "topology": topology,
        "platform": d.platform,
        "device_kind": d.device_kind,
        "devices": int(mesh.devices.size),
        "mesh": dict(mesh.shape),
    }


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip()
    line = next((x.strip() for x in text.splitlines() if x.strip()), type(e).__name__)
    return line[:limit]


# ----------------------------------------------------------------------------------------------------------
# The programs: jitted functions with abstract arguments
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments it is lowered with (`fn.lower(*args, **kwargs)`)."""

    name: str
    fn: Any
    args: tuple
    kwargs: dict
    shapes: dict  # what the batch is, for the report


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) carrying `shardings` (a matching tree).
    Dtypes are canonicalised as `jax.device_put` would (int64 -> int32 without x64)."""

    def one(x, s):
        dtype = (
            x.dtype if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) else jax.dtypes.canonicalize_dtype(x.dtype)
        )
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=s)

    return jax.tree.map(one, tree, shardings)


def shard_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings): the largest shard of each leaf."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize  # a typed PRNG key's dtype has the itemsize of its data
    return int(total)


def model_and_state(c, mesh):
    """(model, abstract train state with its shardings, state shardings, optimizer, schedule), as
    `jax_side._state` builds them, from `jax.eval_shape`s: nothing is allocated."""
    from jaxvlm import configuration, runtime, train_steps
    from jaxvlm.bench import jax_side

    model, params = runtime.build_model(configuration.resolve_model(c.model), c.seed, abstract=True)
    ocfg = jax_side._optimizer_config(c.optimizer)
    optimizer = train_steps.make_optimizer(ocfg, params)
    schedule = train_steps.learning_rate_schedule(ocfg)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, 0), params)
    state_sh = train_steps.state_shardings(state, mesh)
    return model, abstract(state, state_sh), state_sh, optimizer, schedule


def _check_rows(section: str, rows: int, per_micro: int, keys: str, mesh) -> None:
    from jaxvlm.sharding import data_parallel_size

    dp = data_parallel_size(mesh)
    if per_micro % dp:
        raise SectionError(
            f"{keys} = {per_micro} rows per micro-batch ({rows} rows in all), which the "
            f"data x fsdp = {dp} devices of mesh {dict(mesh.shape)} cannot split: make it a "
            f"multiple of {dp}"
        )


def _build_error(section: str, keys: str, e: Exception) -> SectionError:
    return SectionError(f"{section} batch ({keys}): {type(e).__name__}: {_first_line(e)}")


def sft_program(c, model, state, state_sh, optimizer, schedule, mesh) -> Program:
    from jaxvlm import train_steps
    from jaxvlm.bench import workload
    from jaxvlm.sharding import data_parallel_size

    s = c.sft
    keys = f"sft.batch_size={s.batch_size} / sft.micro_batches={s.micro_batches}"
    if s.micro_batches < 1 or s.batch_size % s.micro_batches:
        raise SectionError(f"sft.batch_size={s.batch_size} is not a multiple of sft.micro_batches={s.micro_batches}")
    _check_rows("sft", s.batch_size, s.batch_size // s.micro_batches, keys, mesh)
    try:
        rows = workload.make_rows(
            model.config, s.batch_size, s.seq_len, s.completion_len, workload.image_hw(s.image_hw), c.seed
        )
        mb = workload.sft_microbatches(model.config, rows, s.micro_batches, data_parallel_size(mesh))
        step, batch_sh = train_steps.jit_step(
            train_steps.sft_step,
            mesh,
            state_sh,
            mb,
            1,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            cfg=train_steps.LossConfig(),
        )
    except ValueError as e:
        raise _build_error("sft", f"{keys}, sft.seq_len={s.seq_len}, sft.image_hw={s.image_hw}", e) from e
    shapes = {
        "rows": rows.num_rows,
        "micro_batches": s.micro_batches,
        "seq_len": rows.seq_len,
        "completion_len": s.completion_len,
        "image_hw": workload.image_hw(s.image_hw),
    }
    return Program("sft", step, (state, abstract(mb, batch_sh)), {}, shapes)


def synthetic_rollout(config, rows: int, new_tokens: int, seed: int):
    """A host `sampling.Rollout` of `rows` x `new_tokens` random tokens, none stopped early (the bench samples
    without a stop token), with random old log-probs."""
    from jaxvlm import sampling

    rng = np.random.default_rng(seed)
    special = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    high = min([config.text.vocab_size, *special])
    tokens = rng.integers(0, high, (rows, new_tokens)).astype(np.int32)
    mask = np.ones((rows, new_tokens), np.int32)
    logprobs = -rng.exponential(2.0, (rows, new_tokens)).astype(np.float32)
    return sampling.Rollout(
        tokens=tokens,
        mask=mask,
        logprobs=logprobs,
        lengths=mask.sum(-1).astype(np.int32),
        truncated=np.ones(rows, bool),
        steps=np.asarray(new_tokens, np.int32),
    )


def grpo_program(c, model, state, state_sh, optimizer, schedule, mesh) -> Program:
    from jaxvlm import sampling, train_steps
    from jaxvlm.bench import workload
    from jaxvlm.sharding import data_parallel_size

    s = c.grpo
    g, n = s.num_generations, s.max_new_tokens
    total = s.prompts * g
    keys = f"grpo.prompts={s.prompts} x grpo.num_generations={g} / grpo.micro_batches={s.micro_batches}"
    if s.micro_batches < 1 or total % s.micro_batches:
        raise SectionError(
            f"grpo.prompts={s.prompts} x grpo.num_generations={g} = {total} rows are not a multiple "
            f"of grpo.micro_batches={s.micro_batches}"
        )
    _check_rows("grpo", total, total // s.micro_batches, keys, mesh)
    try:
        rows = workload.make_rows(model.config, s.prompts, s.prompt_len, 0, workload.image_hw(s.image_hw), c.seed + 1)
        inputs = sampling.prepare_prompts(model.config, workload.prompt_batch(rows))
        rollout = synthetic_rollout(model.config, rows.num_rows * g, n, c.seed + 2)
        _, mb = workload.grpo_update_batch(
            model.config, rows, inputs, rollout, g, s.micro_batches, data_parallel_size(mesh)
        )
        step, batch_sh = train_steps.jit_step(
            train_steps.grpo_step,
            mesh,
            state_sh,
            mb,
            2,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            cfg=train_steps.LossConfig(group_size=g),
        )
    except ValueError as e:
        raise _build_error("grpo", f"{keys}, grpo.prompt_len={s.prompt_len}, grpo.image_hw={s.image_hw}", e) from e
    shapes = {
        "rows": total,
        "micro_batches": s.micro_batches,
        "seq_len": rows.seq_len + n,
        "prompt_len": rows.seq_len,
        "completion_len": n,
        "image_hw": workload.image_hw(s.image_hw),
    }
    return Program("grpo", step, (state, abstract(mb, batch_sh)), {}, shapes)


def sampler_program(c, model, state, state_sh, mesh) -> Program:
    """The rollout sampler as the bench's GRPO step runs it (`sampling.generate(..., temperature=1.0,
    use_eos=False, mesh=mesh)` on the train state's params): its host side for real (prompt preparation, settings,
    placements), then the jitted sampler `sampling.compiled_sampler` on abstract arguments."""
    from jaxvlm import sampling
    from jaxvlm.bench import workload

    s = c.grpo
    g, n = s.num_generations, s.max_new_tokens
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(mesh, P()))
    keys = f"grpo.prompts={s.prompts}, grpo.prompt_len={s.prompt_len}, grpo.image_hw={s.image_hw}"
    try:
        rows = workload.make_rows(model.config, s.prompts, s.prompt_len, 0, workload.image_hw(s.image_hw), c.seed + 1)
        sharding = sampling.batch_sharding(mesh)
        sp = sampling.SamplingParams(num_generations=g, max_new_tokens=n, temperature=1.0, use_eos=False).resolve(
            model.config
        )
        inputs = sampling.prepare_prompts(
            model.config, workload.prompt_batch(rows), slot_multiple=sampling.rows_multiple(sharding)
        )
        placements = sampling.input_shardings(inputs, sharding)
    except ValueError as e:
        raise _build_error("sampler", keys, e) from e
    # The train state's params: float32 master weights, sharded as in the state (generate keeps them so).
    args = (state.params, abstract(inputs, placements), key)
    shapes = {
        "prompts": s.prompts,
        "num_generations": g,
        "rows": s.prompts * g,
        "prompt_len": rows.seq_len,
        "max_new_tokens": n,
        "image_hw": workload.image_hw(s.image_hw),
    }
    return Program("sampler", sampling.compiled_sampler(sharding), args, {"config": model.config, "sp": sp}, shapes)


def build(c, mesh, sections: Sequence[str], prepared: tuple | None = None) -> dict[str, Program | SectionError]:
    """The programs of `sections` (or the error that stops each); `prepared`: `model_and_state(c, mesh)`."""
    model, state, state_sh, optimizer, schedule = prepared or model_and_state(c, mesh)
    out: dict[str, Program | SectionError] = {}
    for section in sections:
        try:
            if section == "sft":
                out[section] = sft_program(c, model, state, state_sh, optimizer, schedule, mesh)
            elif section == "grpo":
                out[section] = grpo_program(c, model, state, state_sh, optimizer, schedule, mesh)
            elif section == "sampler":
                out[section] = sampler_program(c, model, state, state_sh, mesh)
            else:
                raise SetupError(f"--sections: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        except SectionError as e:
            out[section] = e
    return out


def model_summary(c, params, lora_config=None) -> dict:
    """Parameter counts of `params` (arrays or abstract) and the model settings: `params` / `vision_params` count the
    base model (adapters apart, so a run with LoRA names the same model as one without), `adapter_params` the LoRA
    adapters, `trainable_params` what the optimizer updates (the adapters with LoRA on, else every parameter);
    `lora`: the adapter settings (`lora_config`, the model config's `LoraConfig`) or None."""
    from jaxvlm.models import lora

    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    base = lora.without_adapters(params)
    adapters = lora.num_adapter_params(params)
    settings = None
    if lora_config is not None:
        settings = {
            "rank": lora_config.rank,
            "alpha": lora_config.alpha,
            "dropout": lora_config.dropout,
            "targets": list(lora_config.targets),
            "adapted_layers": len({path[:-1] for path in _flat_paths(lora.adapters_of(params))}),
        }
    return {
        "preset": c.model.preset,
        "params": count(base),
        "vision_params": count(base.get("visual", {})),
        "adapter_params": adapters,
        "trainable_params": adapters if adapters else count(base),
        "lora": settings,
        "dtype": c.model.dtype,
        "param_dtype": c.model.param_dtype,
        "remat": c.model.remat,
    }


def _flat_paths(tree) -> list[tuple[str, ...]]:
    from flax import traverse_util

    return list(traverse_util.flatten_dict(tree)) if tree else []


def lora_label(m: dict) -> str:
    """The model's LoRA settings in a table header ("" without LoRA)."""
    settings = m.get("lora")
    if not settings:
        return ""
    return (
        f"LoRA rank {settings['rank']} alpha {settings['alpha']:g} dropout {settings['dropout']:g} on "
        f"{settings['adapted_layers']} linear layers (stacks): {m['adapter_params'] / 1e6:,.2f}M adapter params "
        "trained, base frozen"
    )


def state_bytes(state) -> dict:
    """Per-device bytes of an abstract train state (ShapeDtypeStructs carrying their shardings): `params_bytes` (the
    whole tree: base + adapters), `trainable_bytes` (what the optimizer updates: `lora.split_trainable`),
    `adapter_bytes` (0 without LoRA), `optimizer_state_bytes` (AdamW's two moments of the trainable params, plus its
    step counters)."""
    from jaxvlm.models import lora

    trainable, _ = lora.split_trainable(state.params)
    return {
        "params_bytes": shard_bytes(state.params),
        "trainable_bytes": shard_bytes(trainable),
        "adapter_bytes": shard_bytes(lora.adapters_of(state.params)),
        "optimizer_state_bytes": shard_bytes(state.opt_state),
    }


# ----------------------------------------------------------------------------------------------------------
# Compile and analyse
# ----------------------------------------------------------------------------------------------------------


def compile_program(program: Program, dump_dir: str | None = None):
    """(compiled, lower_s, compile_s); XLA's buffer assignment is dumped to `dump_dir` (this compile only)."""
    t0 = time.perf_counter()
    try:
        lowered = program.fn.lower(*program.args, **program.kwargs)
    except Exception as e:  # noqa: BLE001 - a tracing error is this section's, not the command's
        raise SectionError(f"does not trace: {type(e).__name__}: {_first_line(e)}") from e
    t1 = time.perf_counter()
    options = {"xla_dump_to": dump_dir} if dump_dir else None
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED: the program does not fit the device
        raise SectionError(f"does not compile: {_compile_error(e)}") from e
    return compiled, t1 - t0, time.perf_counter() - t1


def _compile_error(e: Exception) -> str:
    """The compiler's message on one line, out-of-memory figures first (libtpu: "Ran out of memory on HBM, the total
    memory required for HLO temporaries (24.00G) exceeds available HBM (15.75G)")."""
    text, head = str(e), _first_line(e, 600)
    m = re.search(r"HLO temporaries \(([^)]+)\) exceeds available (\w+) \(([^)]+)\)", text)
    if m:
        return f"{m.group(1)} of temporaries, {m.group(3)} of {m.group(2)} available ({head})"
    m = re.search(r"Used ([\d.]+\w?) of ([\d.]+\w?) (\w+)", text)
    if m:
        return f"{m.group(1)} used of {m.group(2)} {m.group(3)} ({head})"
    return head


def memory_figures(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {}
    for key in ("argument", "output", "alias", "temp", "generated_code"):
        out[f"{key}_bytes"] = int(getattr(m, f"{key}_size_in_bytes", 0) or 0)
    for key in ("argument", "output", "alias", "temp"):  # host memory (offloading), when there is any
        v = int(getattr(m, f"host_{key}_size_in_bytes", 0) or 0)
        if v:
            out[f"host_{key}_bytes"] = v
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def cost_figures(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend has one
        return {}
    if isinstance(cost, (list, tuple)):  # one dict per program in some jax versions
        cost = cost[0] if cost else {}
    cost = cost or {}
    out = {}
    for name, key in (
        ("flops", "flops"),
        ("bytes_accessed", "bytes accessed"),
        ("transcendentals", "transcendentals"),
        ("optimal_seconds", "optimal_seconds"),
    ):
        if key in cost:
            out[name] = float(cost[key])
    return out


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------


def analyse(program: Program, dump_dir: str) -> dict:
    """Compile `program` and collect every figure of its section (SectionError if it does not compile)."""
    compiled, lower_s, compile_s = compile_program(program, dump_dir)
    out = {
        "shapes": program.shapes,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "memory": memory_figures(compiled),
        "expected_argument_bytes": shard_bytes((program.args,)),
        "cost": cost_figures(compiled),
    }
    parsed = hlo.parse_hlo(compiled.as_text())
    out["collectives"] = hlo.collectives(parsed)
    buffers = hlo.buffer_assignment(dump_dir, parsed)
    if buffers is not None:
        out["buffers"] = buffers
    else:
        out["buffers"] = {
            "source": "optimized HLO (largest instruction results; no buffer assignment was dumped)",
            "largest": hlo.largest_instructions(parsed),
        }
    return out


def report(
    c,
    topology: str,
    shape: Sequence[int],
    sections: Sequence[str],
    workdir: str,
    config_name: str | None = None,
    keep_dump: bool = False,
    log=print,
) -> dict:
    """Build, compile and analyse `sections`; write `<workdir>/memory.json`; return the report."""
    import json

    os.makedirs(workdir, exist_ok=True)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SetupError(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    mesh, where = make_mesh(topology, shape)
    prepared = model_and_state(c, mesh)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config_file": config_name,
        **where,
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "libtpu": libtpu_version(),
        "model": model_summary(c, prepared[1].params, prepared[0].config.lora),
        "peak_formula": PEAK_FORMULA,
        "config": c.to_dict(),
        "sections": {},
    }
    programs = build(c, mesh, sections, prepared)
    state = state_bytes(prepared[1])
    dump_root = os.path.join(workdir, "xla_dump") if keep_dump else tempfile.mkdtemp(prefix="jaxvlm-memory-")
    try:
        for section in sections:
            program = programs[section]
            if isinstance(program, SectionError):
                result["sections"][section] = {"error": str(program)}
                log(f"[memory] {section}: {program}")
                continue
            log(f"[memory] {section}: compiling for {topology} ...")
            try:
                result["sections"][section] = analyse(program, os.path.join(dump_root, section))
                # The train state's share of the arguments; the sampler takes the params alone.
                result["sections"][section]["state"] = (
                    dict(state) if section in TRAINING_SECTIONS else {"params_bytes": state["params_bytes"]}
                )
            except SectionError as e:
                result["sections"][section] = {
                    "shapes": program.shapes,
                    "error": str(e),
                    "error_detail": str(e.__cause__ or e)[:8000],
                }
                log(f"[memory] {section}: {e}")
                continue
            r = result["sections"][section]
            log(
                f"[memory] {section}: peak {r['memory'].get('peak_bytes', 0) / GiB:.2f} GiB per device, "
                f"compiled in {r['compile_s']:.1f} s"
            )
    finally:
        if not keep_dump:
            import shutil

            shutil.rmtree(dump_root, ignore_errors=True)
    with open(os.path.join(workdir, "memory.json"), "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def _size(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def _count(v: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def _shapes(s: dict) -> str:
    if "prompts" in s:
        text = f"{s['prompts']} prompts x G {s['num_generations']}, {s['prompt_len']} + {s['max_new_tokens']} tokens"
    else:
        text = f"{s['rows']} rows ({s['micro_batches']} micro) x {s['seq_len']} tokens"
    return text + (f", image {s['image_hw'][0]}x{s['image_hw'][1]}" if s.get("image_hw") else "")


def table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"jaxvlm memory report (ahead of time, nothing allocated) {result['date']}: "
        f"{result.get('config_file') or 'config'}, preset {m['preset']} ({m['params'] / 1e6:,.1f}M params), "
        f"{m['dtype']} compute / {m['param_dtype']} weights, remat {m['remat']}",
        f"topology {result['topology']}: {result['devices']} x {result['device_kind']}, mesh "
        + " ".join(f"{k}={v}" for k, v in result["mesh"].items())
        + f"; jax {result['jax']}"
        + (f", libtpu {result['libtpu']}" if result.get("libtpu") else ""),
    ]
    if lora_label(m):
        lines.append(lora_label(m))
    sections = result["sections"]
    names = list(sections)
    width = 16
    lines += ["", f"{'per device':34s}" + "".join(f"{n:>{width}s}" for n in names)]

    def row(label, get):
        cells = []
        for n in names:
            r = sections[n]
            try:
                cells.append("error" if "error" in r else get(r))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:34s}" + "".join(f"{c:>{width}s}" for c in cells))

    row("arguments", lambda r: _size(r["memory"]["argument_bytes"]))
    row("  (from shapes and shardings)", lambda r: _size(r["expected_argument_bytes"]))
    row("  params" + (" (base + adapters)" if m.get("lora") else ""), lambda r: _size(r["state"]["params_bytes"]))
    row("  trainable params" + (" (adapters)" if m.get("lora") else ""), lambda r: _size(r["state"]["trainable_bytes"]))
    row("  optimizer state (AdamW)", lambda r: _size(r["state"]["optimizer_state_bytes"]))
    row("outputs", lambda r: _size(r["memory"]["output_bytes"]))
    row("aliased (donated)", lambda r: _size(r["memory"]["alias_bytes"]))
    row("temporaries", lambda r: _size(r["memory"]["temp_bytes"]))
    row("  (in XLA's buffer assignment)", lambda r: _size(_assigned_temp(r["buffers"]["assigned_by_kind"])))
    row("generated code", lambda r: _size(r["memory"]["generated_code_bytes"]))
    row("peak estimate", lambda r: _size(r["memory"]["peak_bytes"]))
    row("device memory assigned (dump)", lambda r: _size(r["buffers"]["assigned_bytes"]))
    row("FLOPs (XLA: loop bodies once)", lambda r: _count(r["cost"]["flops"], "FLOP"))
    row("bytes accessed (loop bodies once)", lambda r: _size(r["cost"]["bytes_accessed"]))
    row("lower + compile (s)", lambda r: f"{r['lower_s']:.1f} + {r['compile_s']:.1f}")
    lines.append(f"peak estimate = {PEAK_FORMULA}")
    lines.append(
        "device memory assigned = every device-memory allocation of XLA's buffer assignment (arguments, "
        "temporaries, outputs not aliased)"
    )
    for n in names:
        r = sections[n]
        lines.append("")
        if "error" in r:
            lines.append(f"{n}: ERROR {r['error']}")
            continue
        lines.append(f"{n}: {_shapes(r['shapes'])}")
        b = r["buffers"]
        lines.append(f"  {len(b['largest'])} largest buffers ({b['source']}):")
        for x in b["largest"]:
            lines.append(
                f"    {_size(x['bytes']):>11s}  {x['kind']:<15s} {x['shape']:<34s} {x.get('op') or '':<18s} "
                f"{_op_name(x.get('op_name'))}"
            )
        live = b.get("live_range_peak")
        if live and live["largest"]:
            lines.append(
                f"  XLA live-range peak {_size(live['bytes'])} (loop bodies' temporaries not always included): "
                + "; ".join(f"{_size(x['bytes'])} {x.get('shape', x['instruction'])}" for x in live["largest"][:3])
            )
        lines.append(
            "  collectives: in the HLO / run per step (x the loops' trip counts), operand bytes per step, "
            "largest operand; then the most bytes per step: operands -> results x runs"
        )
        if not r["collectives"]:
            lines.append("    none")
        for col in r["collectives"]:
            runs = "?" if col["executions"] is None else str(col["executions"])
            moved = "?" if col["operand_bytes_per_run"] is None else _size(col["operand_bytes_per_run"])
            lines.append(
                f"    {col['op']:<19s} {col['count']:>4d} / {runs:<6s} {moved:>11s}  largest "
                f"{col['largest_operand']['operand']}"
            )
            for top in col["top_per_step"]:
                runs = "?" if top["executions"] is None else str(top["executions"])
                lines.append(f"      {top['operand']} -> {top['result']} x{runs}  {_op_name(top['op_name'], 80)}")
    return "\n".join(lines)


def _assigned_temp(by_kind: dict) -> int:
    return sum(v for k, v in by_kind.items() if k in ("temp", "thread-local"))


def _op_name(name: str | None, limit: int = 70) -> str:
    if not name:
        return ""
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _cli() -> None:
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", "configs/bench.py", "Path to a benchmark config file.", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", "/tmp/jaxvlm-memory", "Where memory.json is written.")
    topology = flags.DEFINE_string(
        "topology", "cpu:8", "v5p:2x2x2, v5e:2x4, v4:2x2x1, ... (TPU, needs libtpu) or cpu:N (N simulated CPU devices)."
    )
    mesh = flags.DEFINE_list("mesh", ["1", "-1", "1"], "Mesh shape (data, fsdp, tensor); one -1 = the rest.")
    sections = flags.DEFINE_list("sections", list(SECTIONS), f"Any of {', '.join(SECTIONS)}.")
    keep_dump = flags.DEFINE_bool(
        "keep_dump", False, "Keep XLA's dumps (HLO, buffer assignment) under <workdir>/xla_dump/<section>."
    )

    def main(argv):
        del argv
        try:
            setup_platform(topology.value)
            result = report(
                config.value,
                topology.value,
                [int(x) for x in mesh.value],
                sections.value,
                workdir.value,
                config_flags.get_config_filename(flags.FLAGS["config"]),
                keep_dump.value,
                log=lambda s: print(s, flush=True),
            )
        except SetupError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(table(result), flush=True)
        print(f"\nwrote {os.path.join(workdir.value, 'memory.json')}")

    app.run(main)


if __name__ == "__main__":
    _cli()
