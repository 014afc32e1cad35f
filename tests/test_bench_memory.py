"""The ahead-of-time memory report (`python -m jaxvlm.bench.memory`): run as a user runs it, for a TPU topology
(compiled by libtpu, no TPU here) and for simulated CPU devices; per-section errors; and the argument bytes it
reports checked against the train state and batch it should have compiled."""

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxvlm import configuration, runtime, sharding, train_steps
from jaxvlm.bench import hlo, memory, workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")

_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, "configs", "bench.py"))
bench_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_config)


def _env(**extra):
    """The test session's environment without its forced CPU device count: the command sets its own."""
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    return env


def _memory(workdir, *args, env=None, config="configs/bench.py:tiny"):
    """`python -m jaxvlm.bench.memory --config configs/bench.py:tiny ...` in a fresh process, as a user runs it."""
    cmd = [sys.executable, "-m", "jaxvlm.bench.memory", "--config", config, "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=900)


def _check_section(r: dict) -> None:
    m = r["memory"]
    assert m["argument_bytes"] > 0 and m["temp_bytes"] > 0 and m["output_bytes"] > 0
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
    b = r["buffers"]
    assert b["source"].startswith("XLA buffer assignment")
    sizes = [x["bytes"] for x in b["largest"]]
    assert 0 < len(sizes) <= 10 and sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    assert all(x["shape"] and x["kind"] and x["instruction"] for x in b["largest"])
    assert any(x.get("op_name") for x in b["largest"])  # the JAX op that made it
    assert b["assigned_bytes"] >= m["argument_bytes"] - m["alias_bytes"] and b["assigned_by_kind"]["temp"] > 0
    assert b["live_range_peak"]["bytes"] > 0 and b["live_range_peak"]["largest"]
    assert r["cost"]["flops"] > 0 and r["cost"]["bytes_accessed"] > 0
    assert r["compile_s"] > 0
    ops = {c["op"]: c for c in r["collectives"]}
    assert set(ops) <= set(hlo.COLLECTIVES)
    assert "all-gather" in ops  # params are split 8 ways on fsdp: gathered on use
    for c in ops.values():
        assert c["count"] >= 1 and c["largest_operand"]["operand_bytes"] > 0 and c["largest_operand"]["result"]
        assert 0 < len(c["top_per_step"]) <= 3
        assert all(x["operand_bytes"] <= c["largest_operand"]["operand_bytes"] for x in c["top_per_step"])
        assert c["executions"] is None or c["executions"] >= c["count"]


def _check_report(proc, workdir, platform: str, sections=memory.SECTIONS) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "memory.json")) as f:
        result = json.load(f)
    assert set(result["sections"]) == set(sections)
    for name in sections:
        assert "error" not in result["sections"][name], result["sections"][name]
        _check_section(result["sections"][name])
    assert result["platform"] == platform and result["devices"] == 8
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["jax"] == jax.__version__ and result["config"]["model"]["preset"] == "tiny"
    # The table: one column per section, the peak row, every section's buffers and collectives.
    out = proc.stdout
    assert re.search(r"per device\s+" + r"\s+".join(sections), out)
    assert "peak estimate" in out and "argument + output - alias + temp" in out
    assert out.count("largest buffers (XLA buffer assignment") == len(sections)
    assert out.count("collectives") == len(sections)
    assert "wrote " in out
    return result


@pytest.mark.slow
@needs_libtpu
def test_tpu_topology_report(tmp_path):
    """v5p:2x2x2 compiled by libtpu: every section's figures, buffers and collectives; the versions recorded; and
    libtpu's hostname / lockfile noise kept out of the output."""
    proc = _memory(tmp_path, "--topology", "v5p:2x2x2", "--mesh", "1,8,1", "--config.grpo.prompts=8")
    result = _check_report(proc, tmp_path, "tpu")
    assert result["device_kind"].startswith("TPU v5") and result["libtpu"] == memory.libtpu_version()
    assert "INVALID_ARGUMENT" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr
    sft = result["sections"]["sft"]
    # The TPU pads small arrays to its tiles: XLA's argument bytes are at least the shapes' own.
    assert sft["memory"]["argument_bytes"] >= sft["expected_argument_bytes"]
    assert sft["memory"]["generated_code_bytes"] > 0


@pytest.mark.slow
@needs_libtpu
def test_layer_weights_are_cast_inside_the_layer_loop(tmp_path):
    """With bfloat16 compute and float32 weights, no bfloat16 copy of a scanned layer stack is made outside the layer
    loop. XLA moves a plain narrowing convert of a layer's weight ahead of the scan's per-layer slice and then out of
    the loop, and so keeps every layer's weights twice (0.6 GiB per device at 3B under FSDP 8); `fused.cast` stops
    it. The 100m preset is the smallest bench preset where libtpu does this to `astype` (checked); tiny is not."""
    proc = _memory(
        tmp_path,
        "--topology",
        "v5p:2x2x2",
        "--mesh",
        "1,8,1",
        "--sections",
        "sft",
        "--keep_dump",
        "--config.model.dtype=bfloat16",
        "--config.model.remat=full",
        "--config.sft.batch_size=8",
        config="configs/bench.py:100m",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (hlo_file,) = glob.glob(os.path.join(tmp_path, "xla_dump", "sft", "*after_optimizations.txt"))
    with open(hlo_file) as f:
        text = f.read()
    # Per-device shapes of the stacked layer kernels (entry parameters), then any bf16 convert of that shape.
    stacked = set(
        re.findall(
            r'= f32\[([\d,]+)\]\S* parameter\(\d+\).*op_name="state\.params[^"]*'
            r'(?:layers|blocks)[^"]*kernel',
            text,
        )
    )
    assert len(stacked) >= 4, stacked
    copies = [m.group(0) for m in re.finditer(r"= bf16\[([\d,]+)\]\S* convert\(", text) if m.group(1) in stacked]
    assert not copies, copies


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """cpu:8 (simulated devices set by the command itself, not the environment), a mesh with a -1; the SFT section
    alone (the TPU run above covers all three)."""
    workdir = tmp_path_factory.mktemp("cpu8")
    return _memory(workdir, "--topology", "cpu:8", "--mesh", "1,-1,1", "--sections", "sft"), workdir


@pytest.mark.slow
def test_cpu_topology_report(cpu_run):
    result = _check_report(*cpu_run, "cpu", sections=("sft",))
    for r in result["sections"].values():  # CPU arrays are not padded: XLA's figure is the shapes' exactly
        assert r["memory"]["argument_bytes"] == r["expected_argument_bytes"]


@pytest.mark.slow
def test_rows_the_devices_cannot_split_are_that_sections_error(tmp_path):
    """4 SFT rows on 8 data-parallel devices: the SFT section says which key to change; the sampler still runs
    (in this process, on the test session's 8 CPU devices)."""
    c = bench_config.get_config("tiny")
    c.sft.batch_size, c.grpo.prompts = 4, 8
    result = memory.report(c, "cpu:8", (1, 8, 1), ["sft", "sampler"], str(tmp_path), log=lambda s: None)
    error = result["sections"]["sft"]["error"]
    assert "sft.batch_size=4" in error and "sft.micro_batches=1" in error and "data x fsdp = 8" in error
    assert result["sections"]["sampler"]["memory"]["peak_bytes"] > 0
    assert "sft: ERROR sft.batch_size=4" in memory.table(result)
    with open(tmp_path / "memory.json") as f:
        assert json.load(f)["sections"]["sft"]["error"] == error


@pytest.mark.slow
def test_setup_errors_are_one_line(tmp_path):
    """A mesh that does not match the devices, and a TPU topology without libtpu (hidden by a stand-in that
    fails to import): one line naming the fix, no traceback."""
    proc = _memory(tmp_path, "--topology", "cpu:8", "--mesh", "1,4,1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--mesh (1, 4, 1) has 4 devices; the topology has 8" in proc.stderr
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "libtpu.py").write_text("raise ImportError('libtpu hidden by the test')\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("TPU_LIBRARY_PATH", None)  # `import jax` sets it in this process when libtpu is installed
    proc = _memory(tmp_path, "--topology", "v5p:2x2x2", "--mesh", "1,8,1", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "pip install -e '.[tpu]'" in lines[0]


@needs_libtpu
def test_a_program_that_does_not_fit_is_a_section_error(tmp_path):
    """An XLA compile failure (here: 24 GiB of temporaries on a 16 GiB v5e) is recorded with the compiler's
    figures, as the command records it for a section, instead of crashing (in a child process: libtpu)."""
    script = (
        "import jax, jax.numpy as jnp\n"
        "from jax.sharding import NamedSharding, PartitionSpec as P\n"
        "from jaxvlm.bench import memory\n"
        "memory.setup_platform('v5e:2x2')\n"
        "mesh, _ = memory.make_mesh('v5e:2x2', (1, 4, 1))\n"
        "x = jax.ShapeDtypeStruct((1 << 16, 1 << 15), jnp.float32, sharding=NamedSharding(mesh, P()))\n"
        "try:\n"
        "    memory.compile_program(memory.Program('big', jax.jit(lambda x: x @ x.T), (x,), {}, {}))\n"
        "except memory.SectionError as e:\n"
        "    print('SECTION ERROR', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"SECTION ERROR does not compile: [\d.]+G of temporaries, [\d.]+G of HBM available", proc.stdout
    ), proc.stdout


def _state_bytes(rank: int) -> tuple[dict, dict]:
    """(`memory.state_bytes`, `memory.model_summary`) of the tiny bench config's abstract train state on one device,
    LoRA of `rank` (0 = off); nothing compiled or allocated."""
    from jaxvlm.bench import jax_side

    c = bench_config.get_config("tiny")
    c.model.lora.rank = rank
    model, state, *_ = memory.model_and_state(c, jax_side.default_mesh((1, 1, 1)))
    return memory.state_bytes(state), memory.model_summary(c, state.params, model.config.lora)


def test_lora_optimizer_state_is_the_adapters_two_moments():
    """Per device, from the abstract state's shardings: with LoRA the optimizer state is AdamW's mu and nu of the
    adapters (plus its step counters) and the trainable params the adapters; without, both cover every weight."""
    full, full_model = _state_bytes(0)
    with_lora, model = _state_bytes(4)
    adapter_bytes = 4 * model["adapter_params"]  # float32
    assert model["adapter_params"] == model["trainable_params"] > 0 and model["params"] == full_model["params"]
    assert with_lora["adapter_bytes"] == with_lora["trainable_bytes"] == adapter_bytes
    assert with_lora["params_bytes"] == full["params_bytes"] + adapter_bytes == 4 * model["params"] + adapter_bytes
    assert 2 * adapter_bytes <= with_lora["optimizer_state_bytes"] <= 2 * adapter_bytes + 64
    assert full["adapter_bytes"] == 0 and full["trainable_bytes"] == full["params_bytes"]
    assert 2 * full["params_bytes"] <= full["optimizer_state_bytes"] <= 2 * full["params_bytes"] + 64
    assert with_lora["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 10
    assert full_model["lora"] is None and model["lora"]["rank"] == 4 and model["lora"]["adapted_layers"] == 7


@pytest.mark.slow
def test_lora_report_on_one_device(tmp_path):
    """`--config.model.lora.rank=4` on cpu:1 (the SFT section; the sampler with adapters runs in test_bench's LoRA
    run): the state rows show the adapters' optimizer state, and XLA's argument bytes are the state's and the
    batch's."""
    proc = _memory(
        tmp_path, "--topology", "cpu:1", "--mesh", "1,1,1", "--sections", "sft", "--config.model.lora.rank=4"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "memory.json") as f:
        result = json.load(f)
    full, _ = _state_bytes(0)
    with_lora, model = _state_bytes(4)
    assert result["model"] == json.loads(json.dumps(model))
    sft = result["sections"]["sft"]
    assert sft["state"] == with_lora
    assert sft["memory"]["argument_bytes"] == sft["expected_argument_bytes"]
    batch_bytes = sft["expected_argument_bytes"] - with_lora["params_bytes"] - with_lora["optimizer_state_bytes"]
    assert 0 < batch_bytes < sft["expected_argument_bytes"] / 2  # the rest: step, key and the SFT batch
    out = proc.stdout
    assert "LoRA rank 4 alpha 16 dropout 0 on 7 linear layers" in out
    opt = re.search(r"optimizer state \(AdamW\)\s+(\S+ \S+)\n", out)
    assert opt and opt.group(1) == memory._size(with_lora["optimizer_state_bytes"]), out
    assert re.search(r"trainable params \(adapters\)\s+" + re.escape(memory._size(4 * model["adapter_params"])), out)
    assert full["optimizer_state_bytes"] > 10 * with_lora["optimizer_state_bytes"]


def _per_device_bytes(tree, shardings) -> int:
    def itemsize(dtype):  # a PRNG key's dtype has its data's size; int64 batch fields travel as int32
        return (
            dtype.itemsize
            if jax.dtypes.issubdtype(dtype, jax.dtypes.extended)
            else jax.dtypes.canonicalize_dtype(dtype).itemsize
        )

    return sum(
        math.prod(s.shard_shape(np.shape(x))) * itemsize(x.dtype)
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    )


@pytest.mark.slow
def test_sft_argument_bytes_are_the_state_and_batch(cpu_run):
    """XLA's argument bytes of the cpu:8 run's SFT section equal, per device, the train state (params + AdamW's two
    moments, split by the param rules, plus a few scalars) and the bench's SFT batch (split by rows), computed here
    from the library's builders on a mesh of this session's 8 CPU devices."""
    from jaxvlm.bench import jax_side

    proc, workdir = cpu_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "memory.json")) as f:
        reported = json.load(f)["sections"]["sft"]["memory"]
    c = bench_config.get_config("tiny")
    mesh = sharding.make_mesh((1, 8, 1))
    model, params = runtime.build_model(configuration.resolve_model(c.model), c.seed, abstract=True)
    cfg = model.config
    param_bytes = _per_device_bytes(params, sharding.tree_shardings(params, mesh))
    optimizer = train_steps.make_optimizer(jax_side._optimizer_config(c.optimizer), params)
    state = jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, 0), params)
    state_bytes = _per_device_bytes(state, train_steps.state_shardings(state, mesh))
    assert 3 * param_bytes <= state_bytes <= 3 * param_bytes + 64  # params, mu, nu; step, rng and counts
    rows = workload.make_rows(cfg, c.sft.batch_size, c.sft.seq_len, c.sft.completion_len, tuple(c.sft.image_hw), c.seed)
    mb = workload.sft_microbatches(cfg, rows, c.sft.micro_batches, 8)  # image slots split over the 8 devices
    batch_sh = sharding.batch_shardings(mb, mesh, train_steps.batch_row_axes(1), default_axis=1)
    assert mb["prompt_ids"].shape[1] == 8 and batch_sh["prompt_ids"].shard_shape(mb["prompt_ids"].shape)[1] == 1
    batch_bytes = _per_device_bytes(mb, batch_sh)
    assert reported["argument_bytes"] == state_bytes + batch_bytes
    assert state_bytes - 64 <= reported["alias_bytes"] <= state_bytes  # the step donates its state
