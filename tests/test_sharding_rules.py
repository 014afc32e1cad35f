"""Sharding rules fail loudly: every parameter of every preset has an explicit rule, a parameter without one is a
`ShardingRuleError` at start-up, and the rules place every existing parameter as the catch-all list did."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxvlm import models, sharding, train_steps
from jaxvlm.models.config import PRESETS

# The rule list before the catch-all was removed (kept here for the one-time equality check below).
PREVIOUS_RULES = (
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"lm_head/kernel$", ("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", ("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", ("tensor",)),
    (r"self_attn/o_proj/kernel$", ("tensor", "fsdp")),
    (r"layers/mlp/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"layers/mlp/down_proj/kernel$", ("tensor", "fsdp")),
    (r"visual/patch_embed/kernel$", (None, "fsdp")),
    (r"attn/qkv/kernel$", ("fsdp", "tensor")),
    (r"attn/qkv/bias$", ("tensor",)),
    (r"attn/proj/kernel$", ("tensor", "fsdp")),
    (r"blocks/mlp/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"blocks/mlp/(gate_proj|up_proj)/bias$", ("tensor",)),
    (r"blocks/mlp/down_proj/kernel$", ("tensor", "fsdp")),
    (r"merger/fc1/kernel$", ("fsdp", "tensor")),
    (r"merger/fc1/bias$", ("tensor",)),
    (r"merger/fc2/kernel$", ("tensor", "fsdp")),
    (r".*", ()),
)


def text_only(cfg, tied: bool):
    """A preset's decoder alone: a qwen2 model (qwen3 for the Qwen3-VL presets, whose decoder has q/k norms)."""
    family = "qwen3" if cfg.model_type == "qwen3_vl" else "qwen2"
    text = dataclasses.replace(cfg.text, mrope_interleaved=False)
    return cfg.replace(model_type=family, vision=None, tie_word_embeddings=tied, text=text)


# Every preset as a VL model, plus its decoder alone as a text-only (qwen2 / qwen3) model with a tied and an untied LM
# head (an untied head adds lm_head/kernel). PRESETS itself holds no text-only model.
MODEL_CONFIGS = {
    **{name: cfg for name, cfg in PRESETS.items()},
    **{f"{name}:text_only_tied": text_only(cfg, True) for name, cfg in PRESETS.items()},
    **{f"{name}:text_only_untied": text_only(cfg, False) for name, cfg in PRESETS.items()},
}
# Models whose parameters all existed when the catch-all rule was removed (the "as before" check applies to them).
PREVIOUS_MODELS = sorted(name for name in MODEL_CONFIGS if MODEL_CONFIGS[name].model_type not in ("qwen3_vl", "qwen3"))
MESH_SHAPES = ((1, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8), (2, 4, 1))


@functools.cache
def abstract_params(name: str):
    """Shapes of a model's parameters (`jax.eval_shape` on the init: nothing is allocated)."""
    return models.abstract_params(MODEL_CONFIGS[name])


@functools.cache
def mesh(shape: tuple[int, int, int]):
    return sharding.make_mesh(shape, jax.devices()[: math.prod(shape)])


def abstract_state(params, frozen: tuple[str, ...] = ()) -> train_steps.TrainState:
    optimizer = train_steps.make_optimizer(train_steps.OptimizerConfig(frozen=frozen), params)
    return jax.eval_shape(lambda p: train_steps.create_train_state(p, optimizer, jax.random.key(0)), params)


def leaves(tree) -> dict[str, object]:
    return {sharding.path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def specs(shardings) -> dict[str, P]:
    return {path: s.spec for path, s in leaves(shardings).items()}


def previous_specs(tree, mesh) -> dict[str, P]:
    """What the catch-all rule list gave each leaf (params or an optimizer state, matched on the leaf's own path;
    scalars replicated)."""
    return {
        path: sharding.spec_for(path, leaf.shape, mesh, PREVIOUS_RULES) if leaf.shape else P()
        for path, leaf in leaves(tree).items()
    }


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_parameter_of_every_model_matches_an_explicit_rule(name):
    params = leaves(abstract_params(name))
    assert params, name
    unmatched = [path for path in params if not any(re.search(pattern, path) for pattern, _ in sharding.PARAM_RULES)]
    assert not unmatched, f"{name}: no rule for {unmatched}"
    assert all(pattern != r".*" for pattern, _ in sharding.PARAM_RULES)  # no catch-all
    sharding.tree_shardings(abstract_params(name), mesh((2, 2, 2)))  # and so no error


@pytest.mark.parametrize("name", PREVIOUS_MODELS)
def test_rules_place_every_parameter_and_its_optimizer_state_as_before(name):
    params = abstract_params(name)
    state = abstract_state(params)
    for shape in MESH_SHAPES:
        m = mesh(shape)
        assert specs(sharding.tree_shardings(params, m)) == previous_specs(params, m), (name, shape)
        state_specs = specs(train_steps.state_shardings(state, m))
        assert state_specs == previous_specs(state, m), (name, shape)


def test_qwen3_vl_parameters_are_split_like_their_qwen2_5_vl_counterparts():
    """Qwen3-VL's new parameters: MLP / merger matmuls split as the Qwen2.5-VL ones (input over fsdp, output over
    tensor, and back), norms, q/k norms, the position table and the output biases replicated."""
    params = abstract_params("qwen3_vl_2b")
    got = specs(sharding.tree_shardings(params, mesh((2, 2, 2))))
    expected = {
        "visual/blocks/mlp/linear_fc1/kernel": P(None, "fsdp", "tensor"),
        "visual/blocks/mlp/linear_fc1/bias": P(None, "tensor"),
        "visual/blocks/mlp/linear_fc2/kernel": P(None, "tensor", "fsdp"),
        "visual/blocks/mlp/linear_fc2/bias": P(),
        "visual/merger/linear_fc1/kernel": P("fsdp", "tensor"),
        "visual/merger/linear_fc2/kernel": P("tensor", "fsdp"),
        "visual/deepstack_merger_list/linear_fc1/kernel": P(None, "fsdp", "tensor"),
        "visual/deepstack_merger_list/linear_fc1/bias": P(None, "tensor"),
        "visual/deepstack_merger_list/linear_fc2/kernel": P(None, "tensor", "fsdp"),
        "visual/deepstack_merger_list/norm/scale": P(),
        "visual/merger/norm/bias": P(),
        "visual/blocks/norm1/bias": P(),
        "visual/pos_embed/embedding": P(),
        "visual/patch_embed/bias": P(),
        "language_model/layers/self_attn/q_norm/scale": P(),
        "language_model/layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
    }

    def trimmed(spec: P) -> tuple:  # P(None, None) and P() both replicate
        axes = tuple(spec)
        while axes and axes[-1] is None:
            axes = axes[:-1]
        return axes

    assert {path: trimmed(got[path]) for path in expected} == {path: trimmed(s) for path, s in expected.items()}


def test_frozen_tower_optimizer_state_is_placed_as_before():
    """multi_transform + masks (frozen vision tower): other leaf paths, the same placements."""
    params = abstract_params("tiny")
    state = abstract_state(params, frozen=("^visual/",))
    assert any("inner_states/train" in path for path in leaves(state.opt_state))
    for shape in MESH_SHAPES:
        m = mesh(shape)
        assert specs(train_steps.state_shardings(state, m)) == previous_specs(state, m), shape


def test_a_parameter_without_a_rule_is_an_error_naming_it():
    params = {"language_model": {"renamed_norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)}}}
    message = (
        r"parameter 'language_model/renamed_norm/scale' with shape \(64,\) matches no sharding rule; "
        r"add a \(regex, spec\) rule for it to jaxvlm\.sharding\.PARAM_RULES"
    )
    with pytest.raises(sharding.ShardingRuleError, match=message):
        sharding.tree_shardings(params, mesh((1, 1, 1)))
    with pytest.raises(ValueError, match="language_model/renamed_norm/scale"):  # a ValueError like other config errors
        sharding.spec_for("language_model/renamed_norm/scale", (64,), mesh((1, 1, 1)))
    scalar = {"logit_scale": jax.ShapeDtypeStruct((), jnp.float32)}  # a scalar parameter needs a rule too
    with pytest.raises(sharding.ShardingRuleError, match=r"'logit_scale' with shape \(\)"):
        sharding.tree_shardings(scalar, mesh((1, 1, 1)))


def test_a_renamed_submodule_fails_when_the_stage_starts():
    """The trainer computes `state_shardings` from abstract shapes before it compiles or allocates anything: a
    renamed submodule fails there, naming its parameters."""
    params = abstract_params("tiny")
    merger = dict(params["visual"]["merger"])
    merger["norm_q"] = merger.pop("ln_q")  # was replicated by the catch-all
    params = {**params, "visual": {**params["visual"], "merger": merger}}
    state = abstract_state(params)
    with pytest.raises(sharding.ShardingRuleError, match=r"'visual/merger/norm_q/scale' with shape \(32,\)"):
        train_steps.state_shardings(state, mesh((1, 8, 1)))


def test_optimizer_state_of_a_small_model_gets_shardings():
    params = abstract_params("tiny")
    m = mesh((2, 2, 2))
    for frozen in ((), ("^visual/",)):
        state = abstract_state(params, frozen)
        shardings = train_steps.state_shardings(state, m)
        param_specs = specs(shardings.params)
        opt_specs = specs(shardings.opt_state)
        counts = [path for path in opt_specs if path.endswith("/count")]
        assert counts and all(opt_specs[path] == P() for path in counts)  # Adam's and the schedule's step counts
        moments = [path for path in opt_specs if re.search(r"/(mu|nu)/", path)]
        assert moments and set(moments) | set(counts) == set(opt_specs)
        for path in moments:  # each moment is placed as the parameter it mirrors
            assert opt_specs[path] == param_specs[re.split(r"/(?:mu|nu)/", path)[1]], path
        assert shardings.step.spec == P() and shardings.rng.spec == P()


def test_an_optimizer_leaf_that_mirrors_no_parameter_is_an_error():
    params = abstract_params("tiny")
    opt_state = {"count": jax.ShapeDtypeStruct((), jnp.int32), "ema": jax.ShapeDtypeStruct((7, 3), jnp.float32)}
    with pytest.raises(sharding.ShardingRuleError, match=r"optimizer state leaf 'ema' with shape \(7, 3\) mirrors no "):
        sharding.opt_state_shardings(opt_state, params, mesh((1, 1, 1)))
    placed = sharding.opt_state_shardings({"count": opt_state["count"]}, params, mesh((1, 1, 1)))
    assert placed["count"].spec == P()
    state = jax.eval_shape(optax.adam(1e-3).init, params)  # a plain optax state (no clipping chain) works as well
    sharding.opt_state_shardings(state, params, mesh((1, 8, 1)))
