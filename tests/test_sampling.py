"""The KV-cache sampler: parity with transformers' generate, teacher-forced log-probs, stopping, filters,
sampling statistics, prefill-once, sharding and bfloat16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import IMAGE_TOKEN, image_batch, make_hf_qwen2_checkpoint
from jaxvlm import models, sampling
from jaxvlm.models import qwen2_5_vl
from jaxvlm.processing.rope import get_rope_index
from jaxvlm.processing.vision import layout_images

BATCHES = {  # (images per row, grids)
    "text_left_padded": ([0, 0, 0], []),
    "image": ([1], [[1, 8, 12]]),
    "mixed_left_padded_0_1_2_images": ([0, 1, 2], [[1, 6, 6], [1, 12, 10], [1, 4, 4]]),
}


def text_batch(lengths, seed=0):
    """Left-padded text prompts of the given lengths (ids below the vision tokens)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.integers(0, 280, n)
        mask[i, t - n :] = 1
    return dict(input_ids=ids, attention_mask=mask)


def make_batch(name, seed=1):
    rows, grids = BATCHES[name]
    if not grids:
        return text_batch([5, 9, 7], seed)
    return image_batch(rows, grids, seed=seed)


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: (torch_model, *models.load_pretrained(path)) for name, (torch_model, path) in hf_checkpoints.items()}


def hf_generate(torch_model, batch, max_new_tokens, eos_token_id=None, pad_token_id=0):
    import torch

    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    if "pixel_values" in kwargs:
        kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == IMAGE_TOKEN).int()
    with torch.no_grad():
        out = torch_model.generate(
            **kwargs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return out[:, batch["input_ids"].shape[1] :].numpy()


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------------------


# The fast tier (-m "not slow") keeps one case: text rows of one config.
@pytest.mark.parametrize(
    "case", [c if c == "text_left_padded" else pytest.param(c, marks=pytest.mark.slow) for c in BATCHES]
)
@pytest.mark.parametrize("config_name", ["gqa2_tied_win56", pytest.param("gqa6_untied_win112", marks=pytest.mark.slow)])
def test_greedy_matches_transformers_generate(loaded, config_name, case):
    torch_model, model, params = loaded[config_name]
    batch = make_batch(case)
    n = 16
    ours = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=n, temperature=0.0, suppress_token_ids=()),
    )
    ref = hf_generate(torch_model, batch, n)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert np.asarray(ours.mask).all() and np.asarray(ours.truncated).all()
    assert all(len(np.unique(row)) > 2 for row in ref)  # no row is one repeated token


@pytest.mark.slow
def test_greedy_with_eos_matches_transformers_rows_stop_independently(loaded):
    """Pick as EOS a token that one row emits mid-way: that row stops and pads, the others run on."""
    torch_model, model, params = loaded["gqa2_tied_win56"]
    batch = make_batch("mixed_left_padded_0_1_2_images")
    n = 16
    free = np.asarray(
        sampling.generate(
            model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=n, temperature=0)
        ).tokens
    )
    eos, stop_row, stop_col = _token_first_seen_in_one_row(free)
    ours = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=[eos], pad_token_id=7),
    )
    ref = hf_generate(torch_model, batch, n, eos_token_id=eos, pad_token_id=7)
    np.testing.assert_array_equal(np.asarray(ours.tokens)[:, : ref.shape[1]], ref)
    lengths, truncated = np.asarray(ours.lengths), np.asarray(ours.truncated)
    assert lengths[stop_row] == stop_col + 1 and not truncated[stop_row]
    assert np.asarray(ours.tokens)[stop_row, stop_col + 1 :].tolist() == [7] * (n - stop_col - 1)
    others = [r for r in range(free.shape[0]) if r != stop_row]
    assert (lengths[others] == n).all() and truncated[others].all()
    np.testing.assert_array_equal(np.asarray(ours.mask).sum(-1), lengths)


def _token_first_seen_in_one_row(tokens):
    """(token, row, first column) for a token that appears in exactly one row, not in its first column."""
    for row in range(tokens.shape[0]):
        for col in range(1, tokens.shape[1] - 2):
            tok = tokens[row, col]
            if tok not in tokens[row, :col] and all(tok not in tokens[r] for r in range(tokens.shape[0]) if r != row):
                return int(tok), row, col
    raise AssertionError("no token unique to one row: pick another seed")


# ----------------------------------------------------------------------------------------------------------
# Log-probs and positions
# ----------------------------------------------------------------------------------------------------------


def _repeat_images(batch, images_per_row, g):
    """pixel_values / image_grid_thw for every prompt repeated g times (rows prompt-major)."""
    grids = np.asarray(batch["image_grid_thw"])
    ends = np.cumsum(grids.prod(-1))
    starts = ends - grids.prod(-1)
    first = np.concatenate([[0], np.cumsum(images_per_row)])
    pixels, rep_grids = [], []
    for b in range(len(images_per_row)):
        images = range(first[b], first[b + 1])
        for _ in range(g):
            pixels += [batch["pixel_values"][starts[i] : ends[i]] for i in images]
            rep_grids += [grids[i] for i in images]
    return np.concatenate(pixels), np.stack(rep_grids)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_logprobs_equal_teacher_forced_forward(loaded, temperature):
    torch_model, model, params = loaded["gqa6_untied_win112"]
    case = "mixed_left_padded_0_1_2_images"
    batch, g, n = make_batch(case), 3, 12
    rollout = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(1),
        sampling.SamplingParams(
            num_generations=g, max_new_tokens=n, temperature=temperature, top_k=40, stop_token_ids=[11, 12, 13]
        ),
    )
    inputs = sampling.prepare_prompts(model.config, batch)
    seq = sampling.rollout_sequences(inputs, rollout, g)
    pixels, grids = _repeat_images(batch, BATCHES[case][0], g)
    pixels, vision_inputs = layout_images(pixels, grids, model.config.vision)
    logits = model.apply(
        {"params": params},
        seq["input_ids"],
        seq["attention_mask"],
        pixels,
        position_ids=seq["position_ids"],
        vision_inputs=vision_inputs,
    )
    t = batch["input_ids"].shape[1]
    forced = sampling.token_logprobs(logits[:, t - 1 : t + n - 1], rollout.tokens, temperature)
    mask = np.asarray(rollout.mask).astype(bool)
    assert mask.sum() > n  # something was generated
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[mask], np.asarray(forced)[mask], atol=1e-4)
    assert (np.asarray(rollout.logprobs)[~mask] == 0).all()
    assert not np.isin(np.asarray(rollout.tokens)[mask], [IMAGE_TOKEN, IMAGE_TOKEN + 1]).any()  # suppressed

    # The decode positions equal the M-RoPE positions the host computes for the whole sequence.
    ids, attn = np.asarray(seq["input_ids"]), np.asarray(seq["attention_mask"])
    ref_pos, _ = get_rope_index(ids, attn, grids, image_token_id=IMAGE_TOKEN, spatial_merge_size=2)
    valid = np.broadcast_to(attn.astype(bool)[None], ref_pos.shape)
    np.testing.assert_array_equal(np.asarray(seq["position_ids"])[valid], ref_pos[valid])


@pytest.mark.slow
def test_text_only_qwen2_greedy_matches_transformers(tmp_path):
    torch_model = make_hf_qwen2_checkpoint(tmp_path, tie=True)
    model, params = models.load_pretrained(str(tmp_path))
    batch = text_batch([4, 11, 8], seed=5)
    ours = sampling.generate(
        model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=10, temperature=0)
    )
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf_generate(torch_model, batch, 10))


# ----------------------------------------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stop_tokens_masks_lengths_truncation_and_early_exit(loaded):
    _, model, params = loaded["mha_untied_win28_nofull"]
    batch = text_batch([6, 3, 8, 5], seed=11)
    n = 10
    free = np.asarray(
        sampling.generate(
            model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=n, temperature=0)
        ).tokens
    )
    # A stop id per row taken from its own greedy output; row 3 gets one it never emits.
    stops = {0: free[0, 2], 1: free[1, 0], 2: free[2, n - 1]}
    emitted = set(free[3].tolist())
    stop_ids = [int(s) for s in stops.values() if s not in emitted]
    out = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=stop_ids, pad_token_id=0),
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(4):
        hits = np.flatnonzero(np.isin(free[row], stop_ids))
        length = hits[0] + 1 if hits.size else n
        assert out.lengths[row] == length, row
        assert mask[row].tolist() == [1] * length + [0] * (n - length)
        assert bool(out.truncated[row]) == (hits.size == 0)
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        assert (tokens[row, length:] == 0).all()
    assert int(out.steps) == n

    # When every row has stopped the loop exits early.
    all_stop = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=sorted(set(free[:, 1].tolist()))),
    )
    assert int(all_stop.steps) <= 2 and (np.asarray(all_stop.lengths) <= 2).all()
    assert not np.asarray(all_stop.truncated).any()


@pytest.mark.slow
def test_eos_from_config_and_use_eos_false(loaded):
    _, model, params = loaded["gqa2_tied_win56"]
    batch = text_batch([5, 7], seed=2)
    free = np.asarray(
        sampling.generate(
            model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=8, temperature=0)
        ).tokens
    )
    eos = int(free[0, 3])
    cfg = model.config.replace(text=model.config.text.__class__(**{**model.config.text.__dict__, "eos_token_id": eos}))
    assert sampling.resolve_stop_ids(cfg, [5, eos]) == (eos, 5)
    with_eos = sampling.generate(
        cfg, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=8, temperature=0)
    )
    first = int(np.flatnonzero(free[0] == eos)[0])
    assert int(with_eos.lengths[0]) == first + 1
    no_eos = sampling.generate(
        cfg, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=8, temperature=0, use_eos=False)
    )
    assert np.asarray(no_eos.lengths).tolist() == [8, 8]


# ----------------------------------------------------------------------------------------------------------
# Filters on hand-made logits
# ----------------------------------------------------------------------------------------------------------


def kept(logits, **kw):
    return np.isfinite(np.asarray(sampling.filter_logits(jnp.asarray(logits, jnp.float32), **kw)))


def test_filters_keep_exactly_the_right_tokens():
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))
    assert kept(logits, top_k=2).tolist() == [[False, True, False, True]]
    assert kept(logits, top_k=4).all() and kept(logits, top_k=0).all()
    assert kept([[1.0, 3.0, 3.0, 2.0]], top_k=1).tolist() == [[False, True, True, False]]  # ties at the kth kept
    # top-p: keep a token while the mass strictly ahead of it is < p.
    assert kept(logits, top_p=0.5).tolist() == [[False, True, False, False]]
    assert kept(logits, top_p=0.79).tolist() == [[False, True, False, True]]
    assert kept(logits, top_p=0.81).tolist() == [[False, True, True, True]]
    assert kept(logits, top_p=0.96).all()
    assert kept(logits, top_p=1e-6).tolist() == [[False, True, False, False]]  # never empty
    # min-p: keep p >= min_p * p_max (= 0.5 here).
    assert kept(logits, min_p=0.25).tolist() == [[False, True, True, True]]
    assert kept(logits, min_p=0.35).tolist() == [[False, True, False, True]]
    assert kept(logits, min_p=0.99).tolist() == [[False, True, False, False]]
    # Combined, in transformers' order: top-k 3 -> {.5, .3, .15}; top-p .7 of the renormalised -> {.5, .3}.
    assert kept(logits, top_k=3, top_p=0.6).tolist() == [[False, True, False, True]]


@pytest.mark.slow
def test_filters_match_transformers_warpers():
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).standard_normal((16, 50)).astype(np.float32) * 3
    for kw, warper in [
        (dict(top_k=7), TopKLogitsWarper(7)),
        (dict(top_p=0.9), TopPLogitsWarper(0.9)),
        (dict(top_p=0.3), TopPLogitsWarper(0.3)),
        (dict(min_p=0.05), MinPLogitsWarper(0.05)),
    ]:
        ref = np.isfinite(warper(None, torch.from_numpy(logits.copy())).numpy())
        assert (kept(logits, **kw) == ref).all(), kw


# ----------------------------------------------------------------------------------------------------------
# Sampling statistics
# ----------------------------------------------------------------------------------------------------------


def chi_square_ok(counts, probs, p_value=1e-3):
    """Pearson chi-square goodness of fit (bins with expected < 5 lumped), Wilson-Hilferty critical value."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    total = counts.sum()
    expected = probs * total
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = {1e-3: 3.090}[p_value]
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical, stat, critical


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=3),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=1.0, min_p=0.2),
    ],
)
def test_sample_frequencies_match_tempered_filtered_softmax(kw):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)
    sp = sampling.SamplingParams(**kw)
    draws = np.asarray(sampling.sample_tokens(jax.random.key(42), jnp.tile(logits, (20000, 1)), sp))
    probs = softmax(logits / sp.temperature)
    order = np.argsort(-probs)
    allowed = np.ones(8, bool)
    if sp.top_k:
        allowed[order[sp.top_k :]] = False
    if sp.top_p < 1:
        ahead = np.cumsum(probs[order]) - probs[order]
        allowed[order[ahead >= sp.top_p]] = False
    if sp.min_p:
        allowed &= probs >= sp.min_p * probs.max()
    target = np.where(allowed, probs, 0)
    target /= target.sum()
    counts = np.bincount(draws, minlength=8)
    assert counts[~allowed].sum() == 0
    ok, stat, crit = chi_square_ok(counts[allowed], target[allowed])
    assert ok, (stat, crit)
    assert 0.5 * np.abs(counts / counts.sum() - target).sum() < 0.02  # total variation


@pytest.mark.slow
def test_first_token_frequencies_through_generate(loaded):
    """G draws of the first token of one prompt follow softmax(logits / T) of the model's last position."""
    _, model, params = loaded["gqa2_tied_win56"]
    batch = text_batch([6], seed=4)
    temperature, g = 1.5, 4096
    out = sampling.generate(
        model,
        params,
        batch,
        jax.random.key(7),
        sampling.SamplingParams(num_generations=g, max_new_tokens=1, temperature=temperature, suppress_token_ids=()),
    )
    logits = np.asarray(model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()}))[0, -1]
    probs = softmax(logits.astype(np.float64) / temperature)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size)
    ok, stat, crit = chi_square_ok(counts, probs)
    assert ok, (stat, crit)
    # Returned log-probs are those of the tempered softmax.
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(probs[np.asarray(out.tokens)[:, 0]]), atol=1e-4)


def test_deterministic_for_a_key(loaded):
    _, model, params = loaded["gqa2_tied_win56"]
    batch = text_batch([5, 8], seed=9)
    run = lambda k: np.asarray(  # noqa: E731
        sampling.generate(
            model, params, batch, jax.random.key(k), sampling.SamplingParams(num_generations=4, max_new_tokens=8)
        ).tokens
    )
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(r) for r in a[:4]}) > 1  # a group's rollouts differ from each other


# ----------------------------------------------------------------------------------------------------------
# Prefill once per prompt
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prompt_and_images_are_prefilled_once_per_group(loaded, monkeypatch):
    """Trace-time record of what the vision tower and the full-sequence decoder pass see: the B prompts, not B*G."""
    _, model, params = loaded["gqa2_tied_win56"]
    batch = make_batch("mixed_left_padded_0_1_2_images")
    seen = {"vision": [], "prefill": [], "decode": []}
    vision_call, text_call, text_decode = (
        qwen2_5_vl.VisionTower.__call__,
        qwen2_5_vl.TextModel.__call__,
        qwen2_5_vl.TextModel.decode,
    )

    def record_vision(self, pixel_values, *a, **k):
        seen["vision"].append(pixel_values.shape)
        return vision_call(self, pixel_values, *a, **k)

    def record_text(self, embeds, *a, **k):
        seen["prefill"].append(embeds.shape)
        return text_call(self, embeds, *a, **k)

    def record_decode(self, embeds, position_ids, cache):
        seen["decode"].append((embeds.shape, cache["prompt_k"].shape, cache["gen_k"].shape))
        return text_decode(self, embeds, position_ids, cache)

    monkeypatch.setattr(qwen2_5_vl.VisionTower, "__call__", record_vision)
    monkeypatch.setattr(qwen2_5_vl.TextModel, "__call__", record_text)
    monkeypatch.setattr(qwen2_5_vl.TextModel, "decode", record_decode)
    g, n = 5, 6
    b, t = batch["input_ids"].shape
    out = sampling.generate(
        model, params, batch, jax.random.key(3), sampling.SamplingParams(num_generations=g, max_new_tokens=n + 0)
    )
    slotted, _ = layout_images(batch["pixel_values"], batch["image_grid_thw"], model.config.vision)
    assert seen["vision"] == [slotted.shape]  # one call, the batch's images once
    assert seen["prefill"] == [(b, t, model.config.text.hidden_size)]
    ((embeds, prompt_k, gen_k),) = seen["decode"]  # the loop body, traced once
    layers, kv_heads = model.config.text.num_hidden_layers, model.config.text.num_key_value_heads
    hd = model.config.text.resolved_head_dim
    assert prompt_k == (layers, b, t, kv_heads, hd)  # the prompt cache is not replicated per rollout
    assert gen_k == (layers, b * g, n, kv_heads, hd) and embeds == (b * g, 1, model.config.text.hidden_size)
    assert out.tokens.shape == (b * g, n)


# ----------------------------------------------------------------------------------------------------------
# Mesh and bfloat16
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_generation_equals_single_device(loaded):
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    _, model, params = loaded["gqa6_untied_win112"]
    batch = image_batch([1, 0, 1, 0, 0, 1, 0, 0], [[1, 4, 4], [1, 6, 4], [1, 4, 8]], seed=6)
    kw = dict(num_generations=3, max_new_tokens=8, temperature=1.0, top_p=0.95)
    single = sampling.generate(model, params, batch, jax.random.key(5), sampling.SamplingParams(**kw))
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = sampling.generate(model, params, batch, jax.random.key(5), sampling.SamplingParams(**kw), mesh=mesh)
    assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be split"):
        sampling.generate(
            model,
            params,
            text_batch([3, 4, 5]),
            jax.random.key(0),
            sampling.SamplingParams(max_new_tokens=2),
            mesh=mesh,
        )


@pytest.mark.slow
def test_bfloat16_params_generate_and_score_consistently(hf_checkpoints):
    _, path = hf_checkpoints["gqa2_tied_win56"]
    model, params = models.load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    batch = text_batch([4, 9], seed=8)
    out = sampling.generate(
        model, params, batch, jax.random.key(0), sampling.SamplingParams(num_generations=2, max_new_tokens=8)
    )
    assert out.logprobs.dtype == jnp.float32
    inputs = sampling.prepare_prompts(model.config, batch)
    seq = sampling.rollout_sequences(inputs, out, 2)
    logits = model.apply({"params": params}, **seq)
    forced = sampling.token_logprobs(logits[:, 8:-1], out.tokens, 1.0)
    mask = np.asarray(out.mask).astype(bool)
    # bf16 cached vs. uncached attention round differently; they must still agree to bf16 precision.
    assert np.abs(np.asarray(out.logprobs)[mask] - np.asarray(forced)[mask]).max() < 0.1


# ----------------------------------------------------------------------------------------------------------
# Input checks and text decoding
# ----------------------------------------------------------------------------------------------------------


def test_bad_prompts_and_settings_are_rejected(loaded):
    _, model, params = loaded["gqa2_tied_win56"]
    right_padded = text_batch([3, 5])
    right_padded["input_ids"] = right_padded["input_ids"][:, ::-1].copy()
    right_padded["attention_mask"] = right_padded["attention_mask"][:, ::-1].copy()
    with pytest.raises(ValueError, match=r"rows \[0\] are not left-padded"):
        sampling.generate(model, params, right_padded, jax.random.key(0), sampling.SamplingParams(max_new_tokens=2))
    for bad, msg in [
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(num_generations=0), "num_generations"),
        (dict(min_p=1.0), "min_p"),
        (dict(top_k=-1), "top_k"),
    ]:
        with pytest.raises(ValueError, match=msg):
            sampling.generate(
                model,
                params,
                text_batch([3]),
                jax.random.key(0),
                sampling.SamplingParams(**{"max_new_tokens": 2, **bad}),
            )
    with pytest.raises(TypeError, match="labels"):
        sampling.generate(
            model,
            params,
            dict(text_batch([3]), labels=None),
            jax.random.key(0),
            sampling.SamplingParams(max_new_tokens=2),
        )
    with pytest.raises(ValueError, match="image_grid_thw"):
        batch = make_batch("image")
        del batch["image_grid_thw"]
        sampling.generate(model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="position_ids"):  # vision inputs given, but no way to place the image
        batch = make_batch("image")
        batch["pixel_values"], batch["vision_inputs"] = layout_images(
            batch["pixel_values"], batch.pop("image_grid_thw"), model.config.vision
        )
        sampling.generate(model, params, batch, jax.random.key(0), sampling.SamplingParams(max_new_tokens=2))


def test_decode_completions_with_the_built_in_tokenizer(tmp_path):
    from jaxvlm.tokenizer import build_tokenizer

    tok = build_tokenizer(["the red circle is left of the blue square"] * 20, tmp_path, vocab_size=300)
    a = tok.encode("red circle")
    b = tok.encode("blue")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = np.zeros((2, 6), np.int32)
    tokens[0, : len(a) + 1] = a + [eos]
    tokens[1, : len(b)] = b
    mask = np.zeros_like(tokens)
    mask[0, : len(a) + 1] = 1
    mask[1, : len(b)] = 1
    rollout = sampling.Rollout(
        tokens=tokens,
        mask=mask,
        logprobs=np.zeros(tokens.shape, np.float32),
        lengths=mask.sum(-1),
        truncated=np.array([False, True]),
        steps=np.int32(6),
    )
    assert sampling.decode_completions(tok, rollout) == ["red circle", "blue"]
    assert sampling.decode_completions(tok, rollout, skip_special_tokens=False)[0] == "red circle<|im_end|>"


@pytest.mark.slow
def test_decode_benchmark_runs_on_both_sides(tmp_path):
    """Smoke test of `python -m jaxvlm.bench.decode` pieces (measures nothing; checks they run and report)."""
    from jaxvlm.bench import decode as bench

    cfg = models.preset("tiny")
    model, params = models.Qwen25VL(cfg), models.init_params(cfg, 0)
    models.save_pretrained(model, params, str(tmp_path))
    batch = bench._prompts(2, 8, cfg.text.vocab_size)
    for result in (bench.bench_jax(model, params, batch, 4, 1), bench.bench_torch(str(tmp_path), batch, 4, 1)):
        assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
