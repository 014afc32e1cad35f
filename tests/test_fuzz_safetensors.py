"""Fuzzing the Hugging Face checkpoint readers: seeded mutations of a valid tiny checkpoint written by save_pretrained.

Two surfaces, N cases each (1,000 with JAXVLM_FULL_TESTS=1, a CI-sized handful otherwise), every case reproducible
from its index:

* model.safetensors: truncations, appended bytes, replaced header bytes, other header lengths, non-JSON headers, and
  header edits (dtype strings, shifted offsets, other shapes, dropped / added / mistyped fields, dropped / added /
  renamed / duplicated entries, swapped offsets, metadata). The `safetensors` package (the format's reference reader)
  is the oracle of the file: what we accept it accepts, with the same bytes; what we reject it rejects too, unless the
  header breaks a rule of the format it does not enforce (a header not starting with '{', duplicate keys, entry fields
  beyond dtype / shape / data_offsets). And load_pretrained either returns exactly the original weights or raises
  CheckpointError naming the file or the checkpoint; it returns other weights only where no reader can tell (two
  same-sized tensors' offsets swapped).
* config.json: a field (anywhere in the nested JSON) replaced by a value of another type, 0, a negative, a float, a
  huge number, NaN / Infinity, another field's value, or removed; an unknown field added; the text cut or made
  non-UTF-8. load_pretrained either returns exactly the original weights (the field is one jaxvlm does not read, or
  a valid value that changes no shape) or raises CheckpointError; an error about the config names config.json and the
  field that was changed.

Never a KeyError, ZeroDivisionError, reshape error or any other exception. The summary line of each surface (run with
`-s`) counts the outcomes and names the slowest case.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import struct
import time

import jax
import numpy as np
import pytest

from jaxvlm import models
from jaxvlm.models.checkpoint import ST_DTYPE_BITS, SafetensorsFile
from jaxvlm.models.config import TextConfig, VisionConfig

FULL = os.environ.get("JAXVLM_FULL_TESTS") == "1"
N = 1000 if FULL else 40

# A model small enough that a case is a few milliseconds, with every kind of tensor: untied head, one decoder layer,
# one vision block (full attention), the merger.
FUZZ_CONFIG = models.ModelConfig(
    text=TextConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=10000.0,
        mrope_section=(2, 1, 1),
        max_position_embeddings=256,
    ),
    vision=VisionConfig(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        window_size=56,
        fullatt_block_indexes=(0,),
        out_hidden_size=16,
    ),
    image_token_id=120,
    video_token_id=121,
    vision_start_token_id=122,
    vision_end_token_id=123,
    tie_word_embeddings=False,
)


@dataclasses.dataclass
class Checkpoint:
    path: str
    params: dict  # what load_pretrained returns for the unmutated checkpoint (numpy leaves)
    safetensors: bytes  # model.safetensors
    config: dict  # config.json (transformers 5 form)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Checkpoint:
    path = str(tmp_path_factory.mktemp("fuzz_base"))
    rng = np.random.default_rng(0)
    shapes = models.abstract_params(FUZZ_CONFIG)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    models.save_pretrained(models.Qwen25VL(FUZZ_CONFIG), params, path)
    _, loaded = models.load_pretrained(path)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        raw = f.read()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return Checkpoint(path, jax.tree.map(np.asarray, loaded), raw, config)


def _case_dir(root, i: int, base: Checkpoint, *, safetensors: bytes | None = None, config: bytes | None = None) -> str:
    """A checkpoint directory of its own per case (a memory map of an earlier case's file is never overwritten)."""
    path = os.path.join(str(root), f"case{i:04d}")
    os.makedirs(path)
    for name, content in (("model.safetensors", safetensors), ("config.json", config)):
        if content is None:
            try:
                os.link(os.path.join(base.path, name), os.path.join(path, name))
            except OSError:  # a file system without hard links
                shutil.copyfile(os.path.join(base.path, name), os.path.join(path, name))
        else:
            with open(os.path.join(path, name), "wb") as f:
                f.write(content)
    return path


def _same_weights(got: dict, want: dict) -> bool:
    """Every leaf of `got` is bitwise the leaf of `want` at its path (a tied config drops lm_head, nothing else)."""
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    return (
        all(path in flat_want and np.asarray(leaf).tobytes() == flat_want[path].tobytes() for path, leaf in flat_got)
        and len(flat_got) >= len(flat_want) - 1
    )


def _load_outcome(path: str, base: Checkpoint) -> tuple[str, str]:
    """("same", "") when load_pretrained returns the original weights, ("other", "") when it returns others, or
    ("error", message) for a CheckpointError; any other exception propagates."""
    try:
        _, params = models.load_pretrained(path)
    except models.CheckpointError as e:
        return "error", str(e)
    return ("same" if _same_weights(params, base.params) else "other"), ""


# ---------------------------------------------------------------------------------------------------------------
# model.safetensors


def _split(raw: bytes) -> tuple[int, bytes, bytes] | None:
    """(header length, header bytes, data bytes) of a file whose length field fits it, else None."""
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    return (n, raw[8 : 8 + n], raw[8 + n :]) if 8 + n <= len(raw) else None


def _join(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _edit_header(raw: bytes, rng: random.Random) -> tuple[bytes, str, bool]:
    """One structural edit of the JSON header: (file, kind, whether no reader can detect it)."""
    n, header_bytes, data = _split(raw)
    header = json.loads(header_bytes)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(
        ["dtype", "shift", "shape", "drop field", "add field", "field type", "drop entry", "add entry", "rename"]
        + ["swap offsets", "metadata", "duplicate", "nan"]
    )
    undetectable = False
    if kind == "dtype":
        entry["dtype"] = rng.choice([*ST_DTYPE_BITS, "f32", "F31", "", "float32", 32, None, ["F32"]])
    elif kind == "shift":
        which = rng.choice([[0], [1], [0, 1]])
        delta = rng.choice([-1, 1]) * rng.randint(1, 16)
        entry["data_offsets"] = [o + delta if i in which else o for i, o in enumerate(entry["data_offsets"])]
    elif kind == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice(
            [
                shape[::-1],
                [*shape, 1],
                shape[1:],
                [],
                [d + rng.choice([-1, 1]) for d in shape],
                [float(d) for d in shape],
                [-d for d in shape],
                [str(d) for d in shape],
                [shape],
                [2**64 + d for d in shape],
            ]
        )
    elif kind == "drop field":
        del entry[rng.choice(list(entry))]
    elif kind == "add field":
        entry[rng.choice(["crc32", "offsets", "dtype_", "endianness"])] = rng.choice([0, "le", None, [1, 2]])
    elif kind == "field type":
        entry[rng.choice(list(entry))] = rng.choice(["F32", "0", 1.5, None, True, {"a": 1}, [], [0, 1, 2]])
    elif kind == "drop entry":
        del header[name]
    elif kind == "add entry":
        end = len(data)
        header["extra." + name] = rng.choice(
            [
                {"dtype": "F32", "shape": [0], "data_offsets": [end, end]},  # valid: an empty tensor
                {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]},
                {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
            ]
        )
    elif kind == "rename":
        header[rng.choice(names) + rng.choice(["", "x", ".weight"])] = header.pop(name)
    elif kind == "swap offsets":
        other = header[rng.choice(names)]
        sizes = [e["data_offsets"][1] - e["data_offsets"][0] for e in (entry, other)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        undetectable = entry is not other and sizes[0] == sizes[1]  # each range still fits its tensor
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, ["pt"], "pt", None, {"format": "np"}, {"a": {"b": "c"}}])
    if kind == "duplicate":
        blob = json.dumps(header).encode()
        duplicate = json.dumps({name: entry})[1:-1].encode()
        blob = blob[:-1] + b", " + duplicate + b"}"
    elif kind == "nan":
        blob = (
            json.dumps(header)
            .encode()
            .replace(f'"{name}": {{"dtype"'.encode(), f'"{name}": {{"x": NaN, "dtype"'.encode())
        )
    else:
        blob = json.dumps(header).encode()
    if rng.random() < 0.5:
        blob += b" " * rng.randint(0, 8)  # the format allows trailing spaces
    return _join(blob, data), "edit: " + kind, undetectable


def _mutate_safetensors(raw: bytes, rng: random.Random) -> tuple[bytes, str, bool]:
    """One mutation of a safetensors file: (file, kind, whether no reader can detect it)."""
    kind = rng.choice(["truncate", "append", "header byte", "length", "non-JSON", "edit", "edit", "edit", "edit"])
    parts = _split(raw)
    if parts is None or (kind == "edit" and not _editable(parts[1])):
        kind = rng.choice(["truncate", "append", "length"])
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))], kind, False
    if kind == "append":
        return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), kind, False
    if kind == "length":
        n = parts[0] if parts else 0
        value = rng.choice(
            [0, 1, n - rng.randint(1, 16), n + rng.randint(1, 16), len(raw) - 8, 100_000_001, 2**64 - 1]
            + [rng.getrandbits(64), rng.getrandbits(20)]
        )
        return struct.pack("<Q", value % 2**64) + raw[8:], kind, False
    n, header, data = parts
    if kind == "header byte":
        at = rng.randrange(max(n, 1))
        if n == 0:
            return raw, kind, False
        value = rng.choice([rng.randrange(256), ord(rng.choice('{}[]",:0123456789 FIUB')), 0xFF, 0x00])
        return raw[: 8 + at] + bytes([value]) + raw[9 + at :], kind, False
    if kind == "non-JSON":
        body = bytes(rng.randrange(256) for _ in range(n))
        if rng.random() < 0.5:
            body = b"{" + body[1:]
        return _join(body, data), kind, False
    return _edit_header(raw, rng)


def _editable(header: bytes) -> bool:
    """Whether a header is JSON with at least one well-formed entry (an earlier mutation may have broken it)."""
    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError):
        return False
    if not isinstance(parsed, dict):
        return False
    entries = [e for k, e in parsed.items() if k != "__metadata__"]
    return bool(entries) and all(
        isinstance(e, dict)
        and isinstance(e.get("shape"), list)
        and all(isinstance(d, int) for d in e["shape"])
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and all(isinstance(o, int) for o in e["data_offsets"])
        for e in entries
    )


def _leniencies(raw: bytes) -> set[str]:
    """Rules of the format that safetensors' own reader does not enforce, which this file's header breaks."""
    parts = _split(raw)
    if parts is None:
        return set()
    found = set()
    header = parts[1]
    if not header.startswith(b"{"):
        found.add("not starting with '{'")

    def pairs_hook(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            found.add("duplicate key")
        return dict(pairs)

    try:
        parsed = json.loads(header, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return found
    if isinstance(parsed, dict):
        for name, entry in parsed.items():
            if name != "__metadata__" and isinstance(entry, dict) and set(entry) - {"dtype", "shape", "data_offsets"}:
                found.add("extra entry field")
    return found


def _reference_read(path: str):
    """The safetensors package's reading of the file: None when it rejects it, else {name: (dtype, shape, bytes or
    None where numpy cannot hold the dtype)}."""
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="numpy")
    except Exception:  # the reference raises its own SafetensorError (and OSError, ValueError) on a bad file
        return None
    tensors = {}
    with f:
        for name in f.keys():
            view = f.get_slice(name)
            try:
                data = f.get_tensor(name).tobytes()
            except (TypeError, ValueError):  # a dtype numpy lacks (bfloat16, float8, ...)
                data = None
            tensors[name] = (view.get_dtype(), tuple(view.get_shape()), data)
    return tensors


def _our_read(path: str):
    """Our reading of the file: {name: (dtype, shape, bytes or None for a packed dtype)}; CheckpointError raised."""
    st = SafetensorsFile(path)
    tensors = {}
    for name in st.keys():
        try:
            data = np.array(st.get(name)).tobytes()
        except models.CheckpointError as e:
            assert "packs elements into bits" in str(e), e
            data = None
        tensors[name] = (st.dtype(name), st.shape(name), data)
    del st
    return tensors


def test_mutated_safetensors_load_identically_or_fail_clearly(checkpoint, tmp_path):
    counts, slowest, failures = collections.Counter(), (0.0, ""), []
    for i in range(N):
        rng = random.Random(1_000_003 * i + 17)
        raw, kind, undetectable = checkpoint.safetensors, "", False
        for _ in range(1 if rng.random() < 0.8 else 2):
            raw, step, hidden = _mutate_safetensors(raw, rng)
            kind, undetectable = (f"{kind} + {step}" if kind else step), undetectable or hidden
        start = time.perf_counter()
        path = _case_dir(tmp_path, i, checkpoint, safetensors=raw)
        file = os.path.join(path, "model.safetensors")
        try:
            problem = _check_safetensors_case(file, path, raw, undetectable, checkpoint, counts)
        except Exception as e:  # noqa: BLE001 - any other exception is the failure this test looks for
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures.append(f"case {i} ({kind}): {problem}")
        elapsed = time.perf_counter() - start
        slowest = max(slowest, (elapsed, f"case {i} ({kind})"))
        shutil.rmtree(path)
    print(
        f"\nsafetensors fuzz: {N} cases: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; slowest {slowest[0] * 1000:.1f} ms: {slowest[1]}; failures {len(failures)}"
    )
    assert not failures, "\n".join(failures[:20])


def _check_safetensors_case(file, path, raw, undetectable, base: Checkpoint, counts) -> str:
    """What is wrong with how this mutated file was read and loaded ("" when nothing is)."""
    reference = _reference_read(file)
    try:
        ours = _our_read(file)
    except models.CheckpointError as e:
        if file not in str(e):
            return f"the error does not name the file: {e}"
        if reference is not None and not _leniencies(raw):
            return f"we reject a file safetensors reads, breaking no rule it skips: {e}"
        counts["file rejected"] += 1
        ours = None
    if ours is not None:
        if reference is None:
            return "we read a file safetensors rejects"
        for name, (dtype, shape, data) in ours.items():
            ref_dtype, ref_shape, ref_data = reference[name]
            if (dtype, shape) != (ref_dtype, ref_shape):
                return f"{name}: we read {dtype} {shape}, safetensors {ref_dtype} {ref_shape}"
            if data is not None and ref_data is not None and data != ref_data:
                return f"{name}: our bytes differ from safetensors'"
            counts[
                "tensor bytes compared" if data is not None and ref_data is not None else "tensor bytes skipped"
            ] += 1
        if set(ours) != set(reference):
            return "we and safetensors read different tensor names"
        counts["file read"] += 1
    outcome, message = _load_outcome(path, base)
    if outcome == "error":
        if file not in message and path not in message:
            return f"the load error names neither the file nor the checkpoint: {message}"
        counts["load: clear error"] += 1
    elif outcome == "other":
        if not undetectable:
            return "load_pretrained returned other weights, silently"
        counts["load: other weights (undetectable: swapped same-size offsets)"] += 1
    else:
        counts["load: original weights"] += 1
    return ""


# ---------------------------------------------------------------------------------------------------------------
# config.json


def _flat_form(config: dict) -> dict:
    """The transformers 4.x form of a 5.x qwen2_5_vl config.json: text fields at the root, rope_scaling."""
    config = json.loads(json.dumps(config))
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **{k: v for k, v in text.items() if k != "model_type"}}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return flat


def _paths(value, prefix=()) -> list[tuple]:
    """Every field (dict key or list element) of a JSON value, as a path of keys and indexes."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def _leaves(value) -> list:
    return [v for v in (_get(value, p) for p in _paths(value)) if not isinstance(v, (dict, list))]


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def _replacement(value, others: list, rng: random.Random):
    """A value of another type, or a number out of range, or another field's value, for a field holding `value`."""
    numbers = [0, -1, 2**31, 2**31 - 1, 2**63, 10**30, 1e308, float("inf"), float("-inf"), float("nan"), -1e-9]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers += [-value, value + 0.5, float(value), value * 2, value + 1, max(value - 1, 0)]
    return rng.choice(
        [
            rng.choice(numbers),
            rng.choice(numbers),
            rng.choice([str(value), [value], {"value": value}, None, True, False, "", []]),
            rng.choice(others),
            rng.randint(1, 8),
        ]
    )


def _mutate_config(config: dict, rng: random.Random) -> tuple[bytes, str, tuple | None, set[str]]:
    """(config.json bytes, kind, the path changed, names an error about it may give)."""
    config = json.loads(json.dumps(config))
    kind = rng.choice(["replace"] * 6 + ["delete", "add", "cut text", "not UTF-8"])
    if kind in ("cut text", "not UTF-8"):
        text = json.dumps(config, indent=2).encode()
        at = rng.randrange(len(text))
        text = text[:at] if kind == "cut text" else text[:at] + b"\xff" + text[at:]
        return text, kind, None, set()
    paths = _paths(config)
    path = rng.choice(paths)
    *parents, key = path
    parent = _get(config, parents)
    old = parent[key]
    names = {k for k in path if isinstance(k, str)}
    if isinstance(old, dict):  # a section: an error may name any field in it
        names |= {k for inner in _paths(old) for k in inner if isinstance(k, str)}
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "add":  # a field jaxvlm does not read: never an error
        section = old if isinstance(old, dict) else parent if isinstance(parent, dict) else config
        section["unknown_" + str(rng.randrange(100))] = _replacement(1, [0], rng)
        names = set()
    else:
        kind = "replace"
        parent[key] = _replacement(old, _leaves(config), rng)
    return json.dumps(config, indent=2).encode(), f"{kind} {'.'.join(map(str, path))}", path, names


def test_mutated_config_json_loads_identically_or_fails_clearly(checkpoint, tmp_path):
    counts, slowest, failures = collections.Counter(), (0.0, ""), []
    forms = {"5.x": checkpoint.config, "4.x": _flat_form(checkpoint.config)}
    for i in range(N):
        rng = random.Random(2_000_003 * i + 29)
        form = rng.choice(sorted(forms))
        text, kind, path, names = _mutate_config(forms[form], rng)
        start = time.perf_counter()
        case = _case_dir(tmp_path, i, checkpoint, config=text)
        file = os.path.join(case, "config.json")
        try:
            outcome, message = _load_outcome(case, checkpoint)
            problem = ""
            if outcome == "other":
                problem = "load_pretrained returned other weights, silently"
            elif outcome == "error" and message.startswith(file + ":"):
                counts["config error"] += 1
                named = path is None or any(name in message for name in names)  # cut / non-UTF-8 text: any
                if not named:
                    problem = f"the error names none of {sorted(names)}: {message}"
            elif outcome == "error":
                counts["checkpoint mismatch"] += 1
                if case not in message:
                    problem = f"the error does not name the checkpoint: {message}"
            else:
                counts["loaded, original weights"] += 1
        except Exception as e:  # noqa: BLE001 - any other exception is the failure this test looks for
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures.append(f"case {i} ({form}, {kind}): {problem}")
        elapsed = time.perf_counter() - start
        slowest = max(slowest, (elapsed, f"case {i} ({form}, {kind})"))
        shutil.rmtree(case)
    print(
        f"\nconfig.json fuzz: {N} cases: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; slowest {slowest[0] * 1000:.1f} ms: {slowest[1]}; failures {len(failures)}"
    )
    assert not failures, "\n".join(failures[:20])
