"""jaxvlm.checkpoint.TrainCheckpointer: round trips, retention, resharding, bitwise resume, errors, damaged steps."""

import gc
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxvlm.checkpoint import CheckpointError, TrainCheckpointer, abstract_like, step_problems


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def mesh_8():
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


OPTIMIZERS = {
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "multisteps_adamw": lambda: optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2),
}


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_round_trip(tmp_path, opt_name):
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
        "emb": jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16),
        "ids": jnp.arange(6, dtype=jnp.int32),
    }
    trainable = {k: v for k, v in params.items() if k != "ids"}
    opt = OPTIMIZERS[opt_name]()
    opt_state = opt.init(trainable)
    # One real update, so mu / nu / counts are not all zeros.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), trainable)
    _, opt_state = opt.update(grads, opt_state, trainable)
    state = dict(params=params, opt_state=opt_state, step=jnp.int32(7), key=jax.random.key(42))
    data_state = {"next_index": 123, "worker": [0, 1], "name": "shard-0"}
    config = {"lr": 1e-3, "model": {"layers": 2, "dtype": "bfloat16"}}

    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(7, state, data_state=data_state, config=config)
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:  # a fresh manager, as after a restart
        assert ckpt.latest_step() == 7
        restored, restored_data, restored_config = ckpt.restore(abstract_like(state))

    assert_trees_equal(restored, state)
    assert step_problems(tmp_path / "7", {"data_state": ("next_index",), "config": ("lr",)}, read_arrays=True) == []
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
    np.testing.assert_array_equal(jax.random.normal(restored["key"], (3,)), jax.random.normal(state["key"], (3,)))
    assert restored_data == data_state and restored_config == config


def test_keep_interval_force_and_missing_items(tmp_path):
    state = {"x": jnp.arange(4.0), "key": jax.random.key(0)}
    with TrainCheckpointer(tmp_path / "keep", save_every=1, keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
        assert not ckpt.save(5, state, force=True)  # never overwrites a saved step
        # Neither data_state nor config was saved: both restore as None.
        restored, data_state, config = ckpt.restore(abstract_like(state), step=4)
        assert data_state is None and config is None
        assert_trees_equal(restored, state)

    with TrainCheckpointer(tmp_path / "interval", save_every=3, async_save=False) as ckpt:
        assert [s for s in range(10) if ckpt.should_save(s)] == [0, 3, 6, 9]
        assert not ckpt.save(4, state)
        assert ckpt.save(3, state)
        assert ckpt.save(4, state, force=True)
        assert ckpt.save(6, state, config={"a": 1})
        assert ckpt.all_steps() == [3, 4, 6]
        assert ckpt.restore(abstract_like(state))[1:] == (None, {"a": 1})


def test_reshard_8_devices_to_1_and_back(tmp_path):
    assert jax.device_count() == 8
    mesh = mesh_8()
    rng = np.random.default_rng(1)
    host = {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}
    specs = {"w": P("data", "fsdp"), "b": P("fsdp"), "key": P()}
    sharded = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    one = SingleDeviceSharding(jax.devices()[0])
    keys = jax.random.split(jax.random.key(3), 4)  # a batch of typed keys, sharded along "data"

    # 8 devices -> 1 device.
    state = {k: jax.device_put(v, sharded[k]) for k, v in host.items()}
    state["key"] = jax.device_put(keys, NamedSharding(mesh, P("data")))
    assert len(state["w"].sharding.device_set) == 8
    with TrainCheckpointer(tmp_path / "from8", save_every=1) as ckpt:
        ckpt.save(1, state)
        restored, _, _ = ckpt.restore(abstract_like(state, one))
    for k, x in restored.items():
        assert x.sharding == one, k
    assert_trees_equal(restored, state)

    # 1 device -> 8 devices, onto the requested shardings.
    state = {k: jax.device_put(v, one) for k, v in host.items()} | {"key": jax.device_put(keys, one)}
    with TrainCheckpointer(tmp_path / "from1", save_every=1) as ckpt:
        ckpt.save(1, state)
        restored, _, _ = ckpt.restore(abstract_like(state, sharded))
    for k, x in restored.items():
        assert x.sharding.is_equivalent_to(sharded[k], x.ndim), (k, x.sharding)
    assert restored["w"].addressable_shards[0].data.shape == (4, 4)
    assert_trees_equal(restored, state)


# --- bitwise resume of a tiny deterministic training loop ---

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=6, end_value=1e-4)
OPT = optax.adamw(SCHEDULE, weight_decay=0.1)


def init_state(seed):
    k1, k2, data_key = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 16)) / 2,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 1)) / 4,
        "b2": jnp.zeros(1),
    }
    return dict(params=params, opt_state=OPT.init(params), step=jnp.int32(0), key=data_key)


@jax.jit
def train_step(state):
    # The batch depends only on the step and the key carried in the state.
    x = jax.random.normal(jax.random.fold_in(state["key"], state["step"]), (8, 4))
    y = jnp.sin(x.sum(-1, keepdims=True))

    def loss_fn(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = OPT.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, opt_state=opt_state, step=state["step"] + 1, key=state["key"])


def test_bitwise_resume(tmp_path):
    reference = init_state(0)
    for _ in range(6):
        reference = train_step(reference)

    state = init_state(0)
    with TrainCheckpointer(tmp_path, save_every=3) as ckpt:
        for _ in range(3):
            state = train_step(state)
            ckpt.save(int(state["step"]), state, data_state={"step": int(state["step"])})
    del state

    # "Restart": abstract state from eval_shape + the current shardings, as a trainer would build it.
    abstract = abstract_like(jax.eval_shape(init_state, 0), SingleDeviceSharding(jax.devices()[0]))
    with TrainCheckpointer(tmp_path, save_every=3) as ckpt:
        state, data_state, _ = ckpt.restore(abstract)
    assert int(state["step"]) == 3 and data_state == {"step": 3}
    for _ in range(3):
        state = train_step(state)

    assert int(state["step"]) == 6
    assert_trees_equal(state["params"], reference["params"])
    assert_trees_equal(state["opt_state"], reference["opt_state"])
    assert_trees_equal(state, reference)


def test_errors_name_the_directory(tmp_path):
    state = {"x": jnp.zeros(2)}
    with TrainCheckpointer(tmp_path / "empty", save_every=1) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
            ckpt.restore(abstract_like(state))
        ckpt.save(2, state)
        with pytest.raises(FileNotFoundError, match=rf"step 5 in {tmp_path / 'empty'}"):
            ckpt.restore(abstract_like(state), step=5)
    with pytest.raises(ValueError, match="save_every"):
        TrainCheckpointer(tmp_path / "bad", save_every=0)


@pytest.mark.slow
def test_bitwise_resume_of_real_sft_steps_and_restore_across_meshes(tmp_path):
    """The model's sft_step: 2 steps, save, restore in a fresh checkpointer, 2 more steps == 4 uninterrupted steps,
    bit for bit; the sharded train state also restores onto one device and back."""
    import functools

    from jaxvlm import sharding, train_steps
    from test_train_steps import MODEL, make_state, policy_batch

    batches = [policy_batch((1,), 4, seed=s) for s in range(4)]
    state, optimizer, schedule = make_state()
    step = jax.jit(
        functools.partial(
            train_steps.sft_step, model=MODEL, optimizer=optimizer, schedule=schedule, cfg=train_steps.LossConfig()
        )
    )
    straight = state
    for batch in batches:
        straight, _ = step(straight, batch)

    resumed = state
    for batch in batches[:2]:
        resumed, _ = step(resumed, batch)
    with TrainCheckpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        assert ckpt.save(2, resumed, data_state={"next_batch": 2}, config={"lr": 1e-3})
    fresh_state = make_state()[0]
    with TrainCheckpointer(tmp_path / "ckpt", save_every=2) as ckpt:
        resumed, data_state, config = ckpt.restore(abstract_like(fresh_state))
    assert data_state == {"next_batch": 2} and config == {"lr": 1e-3} and int(resumed.step) == 2
    for batch in batches[data_state["next_batch"] :]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(resumed, straight)

    # Any checkpoint exports to the Hugging Face format (and loads back unchanged).
    from jaxvlm import models

    models.save_pretrained(MODEL, resumed.params, str(tmp_path / "hf"))
    _, exported = models.load_pretrained(str(tmp_path / "hf"))
    assert_trees_equal(exported, resumed.params)

    # Saved sharded over (2, 2, 2), restored onto one device, and the reverse.
    mesh = sharding.make_mesh((2, 2, 2))
    state_sh = train_steps.state_shardings(straight, mesh)
    with TrainCheckpointer(tmp_path / "sharded", save_every=1) as ckpt:
        ckpt.save(4, jax.device_put(straight, state_sh))
        one = ckpt.restore(abstract_like(straight, SingleDeviceSharding(jax.devices()[0])))[0]
    assert_trees_equal(one, straight)
    with TrainCheckpointer(tmp_path / "single", save_every=1) as ckpt:
        ckpt.save(4, straight)
        back = ckpt.restore(abstract_like(straight, state_sh))[0]
    kernel = back.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    assert_trees_equal(back, straight)


# --- damaged steps: named, set aside, the newest intact step restored ---


def damage_state():
    """One array large enough to live in a data file of its own (small ones are inlined in the OCDBT index)."""
    rng = np.random.default_rng(5)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
        "b": jnp.arange(3.0),
        "key": jax.random.key(1),
    }


def two_steps(directory, state):
    """Steps 1 and 2 of `state` (step 2's arrays are step 1's + 1), data_state {"step": n}."""
    with TrainCheckpointer(directory, save_every=1) as ckpt:
        ckpt.save(1, state, data_state={"step": 1})
        ckpt.save(2, {**state, "w": state["w"] + 1, "b": state["b"] + 1}, data_state={"step": 2})


def largest_file(directory):
    files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def overwrite_with_garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


# (what to damage in step 2, how, what the message names)
DAMAGE = {
    "array data truncated": (largest_file, truncate_half, r"state/ocdbt\.process_0/d/\w+: truncated \(\d+ bytes"),
    "array data deleted": (largest_file, os.remove, r"state/ocdbt\.process_0/d/\w+: missing .*array 'w'"),
    "array data overwritten": (largest_file, overwrite_with_garbage, r"state array 'w' does not read back"),
    "data_state JSON corrupt": (
        lambda step: os.path.join(step, "data_state", "metadata"),
        lambda p: open(p, "w").write('{"step": '),
        r"data_state/metadata: not valid JSON",
    ),
    "index manifest deleted": (
        lambda step: os.path.join(step, "state", "manifest.ocdbt"),
        os.remove,
        r"state/manifest\.ocdbt: missing",
    ),
    "array metadata truncated": (lambda step: os.path.join(step, "state", "_METADATA"), truncate_half, "_METADATA"),
}


@pytest.fixture
def collect_orbax_coroutines():
    """Orbax's reader leaves un-awaited coroutines behind when an array fails to read, which Python reports whenever
    they are collected: collect them in the test that caused them, where `orbax_unraisable` ignores the report."""
    yield
    gc.collect()


def orbax_unraisable(test):
    ignore = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    return pytest.mark.usefixtures("collect_orbax_coroutines")(ignore(test))


@orbax_unraisable
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_step_is_named_set_aside_and_the_previous_step_restored(tmp_path, damage, caplog):
    pick, spoil, message = DAMAGE[damage]
    state = damage_state()
    two_steps(tmp_path, state)
    spoil(pick(str(tmp_path / "2")))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        with caplog.at_level("WARNING"):
            restored, data_state, _ = ckpt.restore(abstract_like(state), required_items={"data_state": ("step",)})
        assert data_state == {"step": 1}
        assert_trees_equal(restored, state)
        [record] = ckpt.set_aside
        assert record.step == 2 and re.search(message, "; ".join(record.problems)), record.problems
        assert record.moved_to == str(tmp_path / "2.damaged")
        assert re.search(rf"{tmp_path / '2'} is damaged, using step 1 instead; moved to .*2\.damaged", caplog.text)
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, state, data_state={"step": 2})  # the step number is free again
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.damaged"]
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:  # Orbax never lists the .damaged directory
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore(abstract_like(state))[1] == {"step": 2} and ckpt.set_aside == []


def test_a_step_damaged_twice_is_kept_under_a_new_name(tmp_path):
    state = damage_state()
    two_steps(tmp_path, state)
    os.makedirs(tmp_path / "2.damaged")  # evidence from an earlier failure
    truncate_half(largest_file(str(tmp_path / "2")))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.restore(abstract_like(state))[1] == {"step": 1}
        assert ckpt.set_aside[0].moved_to == str(tmp_path / "2.damaged.2")
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged", "2.damaged.2"]


def test_no_intact_step_lists_every_step_and_moves_nothing(tmp_path):
    state = damage_state()
    two_steps(tmp_path, state)
    truncate_half(largest_file(str(tmp_path / "2")))
    os.remove(os.path.join(tmp_path, "1", "data_state", "metadata"))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError) as error:
            ckpt.restore(abstract_like(state), required_items={"data_state": ("step",)})
        assert ckpt.set_aside == [] and ckpt.all_steps() == [1, 2]
    text = str(error.value)
    assert text.startswith(f"no intact checkpoint in {tmp_path}; every step is damaged:")
    assert re.search(r"\n  step 2: state/ocdbt\.process_0/d/\w+: truncated", text)
    assert "\n  step 1: data_state/metadata: missing" in text
    assert text.endswith(f"rm -r {tmp_path / '2'} {tmp_path / '1'}")
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


@orbax_unraisable
def test_an_explicit_damaged_step_raises_and_a_mismatch_is_not_damage(tmp_path):
    state = damage_state()
    two_steps(tmp_path, state)
    with open(tmp_path / "1" / "data_state" / "metadata", "w") as f:
        f.write("[")
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(CheckpointError, match=rf"{tmp_path / '1'} is damaged: data_state/metadata: not valid JSON"):
            ckpt.restore(abstract_like(state), step=1)
    # Intact files that do not fit the requested state: an error, and nothing is moved.
    two_steps(tmp_path / "intact", state)
    with TrainCheckpointer(tmp_path / "intact", save_every=1) as ckpt:
        other = {**state, "w": jnp.zeros((8, 8))}
        with pytest.raises(
            CheckpointError, match=r"/2 does not restore \(ValueError: .*reads back intact, and neither does step 1, so"
        ):
            ckpt.restore(abstract_like(other))
        assert ckpt.set_aside == [] and ckpt.all_steps() == [1, 2]


@orbax_unraisable
def test_a_step_failing_with_files_that_read_back_is_damaged_when_an_older_step_restores(tmp_path):
    """A changed key in Orbax's per-array metadata: valid JSON, every array reads back, yet the restore fails."""
    state = damage_state()
    two_steps(tmp_path, state)
    path = tmp_path / "2" / "state" / "array_metadatas" / "process_0"
    path.write_text(path.read_text().replace('"param_name"', '"param_nbme"'))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.restore(abstract_like(state))[1] == {"step": 1}
        [record] = ckpt.set_aside
    assert record.step == 2 and re.fullmatch(
        r"does not restore \(.*param_name.*\) although every file parses and reads back", record.problems[0]
    ), record.problems


def test_intact_steps_have_no_problems_and_newest_intact_step_skips_damage(tmp_path):
    state = damage_state()
    two_steps(tmp_path, state)
    for step in ("1", "2"):
        assert step_problems(tmp_path / step, {"data_state": ("step",)}, read_arrays=True) == []
    assert step_problems(tmp_path / "2", {"config": ()}) == ["config/metadata: missing"]
    assert step_problems(tmp_path / "2", {"data_state": ("step", "iterator")}) == [
        "data_state/metadata: lacks 'iterator' (has 'step')"
    ]
    truncate_half(largest_file(str(tmp_path / "2")))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.newest_intact_step() == 1 and [d.step for d in ckpt.set_aside] == [2]
    with TrainCheckpointer(tmp_path / "none", save_every=1) as ckpt:
        assert ckpt.newest_intact_step() is None
