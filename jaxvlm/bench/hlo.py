"""Reading XLA's compiled programs: optimized HLO text (shapes, computations, loop trip counts, collectives) and
the buffer assignment XLA dumps for a compile (the largest device-memory buffers and what made them).

Used by `jaxvlm.bench.memory`; text formats as jaxlib 0.10 / libtpu 0.0.42 print them.
"""

from __future__ import annotations

import glob
import math
import os
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
TOP_BUFFERS = 10
LIVE_RANGE_NOTE = (
    "XLA's live ranges over the entry computation's schedule at their peak: a loop body's own "
    "temporaries are not always among them, so this can be far below the temporaries"
)


_DTYPE_BYTES = {
    "pred": 1,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays or tuples; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype.startswith("f8") or dtype.startswith("f4") or dtype.startswith("f6"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dtype)
            if size is None:
                continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def short_shape(shape: str) -> str:
    """`bf16[8,2048]{1,0:T(8,128)}` -> `bf16[8,2048]` (tuples element by element)."""
    arrays = [f"{d}[{s}]" for d, s in _ARRAY.findall(shape)]
    if len(arrays) == 1:
        return arrays[0]
    if len(arrays) > 4:  # a loop carry: say how many, and the largest
        return f"({len(arrays)}-tuple, largest {max(arrays, key=shape_bytes)})"
    return "(" + ", ".join(arrays) + ")"


def _split_instruction(line: str):
    """(name, shape, opcode, operand text, attributes) of an HLO instruction line, or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
        depth, close = 0, len(rest) - 1
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                close = i
                break
        shape, rest = rest[: close + 1], rest[close + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op, paren, rest = rest.partition("(")
    if not paren:
        return None
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return m.group(1), shape, op.strip(), rest[:end], rest[end + 1 :]


def parse_hlo(text: str) -> dict:
    """Instructions by name ({computation, shape, op, operands, attrs}), computations, and each computation's
    executions per run of the entry (1 for the entry; a while body x its known trip count, or None if unknown)."""
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        if stripped.endswith("{") and ("->" in stripped) and not _INSTR.match(line):
            is_entry = stripped.startswith("ENTRY")
            name = stripped.split()[1 if is_entry else 0].lstrip("%")
            current = name
            computations[current] = []
            if is_entry:
                entry = name
            continue
        if stripped == "}":
            current = None
            continue
        if current is None:
            continue
        parts = _split_instruction(line)
        if parts is None:
            continue
        name, shape, op, operands, attrs = parts
        instructions[name] = {
            "computation": current,
            "shape": shape,
            "op": op,
            "text": operands,
            "operands": re.findall(r"%([\w.\-]+)", operands),
            "attrs": attrs,
        }
        computations[current].append(name)
    callers: dict[str, list[tuple[str, int | None]]] = {}
    for ins in instructions.values():
        called = _CALLED.findall(ins["attrs"])
        trip = _trip_count(ins, dict(called), instructions, computations) if ins["op"] == "while" else None
        for kind, value in called:
            factor = trip if kind == "body" else 1
            for callee in re.findall(r"[\w.\-]+", value):
                callers.setdefault(callee, []).append((ins["computation"], factor))
    memo: dict[str, int | None] = {}

    def times(comp: str, depth: int = 0) -> int | None:
        if comp == entry or depth > 200:
            return 1
        if comp in memo:
            return memo[comp]
        total: int | None = 0
        for caller, factor in callers.get(comp, []):
            t = times(caller, depth + 1)
            if t is None or factor is None:
                total = None
                break
            total += t * factor
        memo[comp] = total
        return total

    return {
        "instructions": instructions,
        "computations": computations,
        "entry": entry,
        "times": {c: times(c) for c in computations},
    }


def _operands(shapes: list[str]) -> str:
    """Operand shapes, comma-separated; many of them (a combined collective) summarised."""
    if len(shapes) <= 3:
        return ", ".join(shapes)
    if len(set(shapes)) == 1:
        return f"{len(shapes)} x {shapes[0]}"
    return f"{len(shapes)} operands, largest {max(shapes, key=shape_bytes)}"


def _int_constant(instructions: dict, name: str) -> int | None:
    ins = instructions.get(name)
    if ins is None or ins["op"] != "constant" or not re.fullmatch(r"-?\d+", ins["text"].strip()):
        return None
    return int(ins["text"])


def _trip_count(ins: dict, called: dict, instructions: dict, computations: dict) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count` when the HLO carries it, else read from the loop's
    condition (`counter < N`, the counter being element 0 of the carry, starting at its initial constant or 0)."""
    known = _TRIP.search(ins["attrs"])
    if known:
        return int(known.group(1))
    cond = called.get("condition", "").lstrip("%")
    root = next(
        (instructions[n] for n in reversed(computations.get(cond, [])) if instructions[n]["op"] == "compare"), None
    )
    if root is None or len(root["operands"]) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root["attrs"])
    direction = direction.group(1) if direction else ""
    a, b = root["operands"]
    if direction in ("LT", "LE") and _int_constant(instructions, b) is not None:
        limit = _int_constant(instructions, b) + (direction == "LE")
    elif direction in ("GT", "GE") and _int_constant(instructions, a) is not None:
        limit = _int_constant(instructions, a) + (direction == "GE")
    else:
        return None
    start = 0
    init = instructions.get(ins["operands"][0]) if ins["operands"] else None
    if init is not None and init["op"] == "tuple" and init["operands"]:
        start = _int_constant(instructions, init["operands"][0]) or 0
    return max(limit - start, 0)


def _op_name_of(instructions: dict, name: str, hops: int = 6) -> tuple[str | None, str | None]:
    """(opcode, op_name) of instruction `name`; an op_name-less copy / bitcast / tuple access takes its operand's."""
    ins = instructions.get(name)
    if ins is None:
        return None, None
    op = ins["op"]
    for _ in range(hops):
        m = _OP_NAME.search(ins["attrs"])
        if m:
            return op, m.group(1).replace("\\'", "'").replace('\\"', '"')
        if not ins["operands"] or ins["operands"][0] not in instructions:
            break
        ins = instructions[ins["operands"][0]]
    return op, None


def collectives(hlo: dict, top: int = 3) -> list[dict]:
    """Per collective kind: static count, executions per run (None if some loop's trip count is unknown), the
    operand bytes per run, the largest operand, and the `top` distinct collectives by operand bytes per run (operand
    bytes x executions), each with its shapes, executions, replica groups and op_name."""
    instructions = hlo["instructions"]
    kinds: dict[str, dict] = {}
    for name, ins in instructions.items():
        op = ins["op"]
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base not in COLLECTIVES:
            continue
        operand_shapes = [instructions[o]["shape"] for o in ins["operands"] if o in instructions]
        operand_bytes = sum(shape_bytes(s) for s in operand_shapes)
        runs = hlo["times"].get(ins["computation"])
        entry = kinds.setdefault(
            base, {"op": base, "count": 0, "executions": 0, "operand_bytes_per_run": 0, "largest": []}
        )
        entry["count"] += 1
        if runs is None or entry["executions"] is None:
            entry["executions"] = None
            entry["operand_bytes_per_run"] = None
        else:
            entry["executions"] += runs
            entry["operand_bytes_per_run"] += runs * operand_bytes
        _, op_name = _op_name_of(instructions, name)
        groups = re.search(r"replica_groups=(\S+(?: \{[^}]*\})?)", ins["attrs"])
        entry["largest"].append(
            {
                "operand": _operands([short_shape(s) for s in operand_shapes]),
                "operand_bytes": operand_bytes,
                "result": short_shape(ins["shape"]),
                "executions": runs,
                "instruction": name,
                "replica_groups": groups.group(1).rstrip(",") if groups else None,
                "op_name": op_name,
            }
        )
    out = []
    for entry in kinds.values():
        items = entry.pop("largest")
        entry["largest_operand"] = max(items, key=lambda x: x["operand_bytes"])
        per_step = lambda x: (-(x["operand_bytes"] * (x["executions"] or 1)), -x["operand_bytes"])  # noqa: E731
        seen, top_items = set(), []
        for item in sorted(items, key=per_step):
            key = (item["operand"], item["op_name"])
            if key not in seen:
                seen.add(key)
                top_items.append(item)
        entry["top_per_step"] = top_items[:top]
        out.append(entry)
    return sorted(out, key=lambda e: COLLECTIVES.index(e["op"]))


def largest_instructions(hlo: dict, top: int = TOP_BUFFERS) -> list[dict]:
    """The fallback for buffers: the largest instruction results of the optimized HLO (not a buffer assignment:
    results that share or reuse memory are listed apart, and arguments appear as `parameter`)."""
    items = []
    for name, ins in hlo["instructions"].items():
        if ins["op"] in ("get-tuple-element", "tuple", "bitcast") or ins["shape"].startswith("("):
            continue
        entry_param = ins["op"] == "parameter" and ins["computation"] == hlo["entry"]
        items.append(
            {
                "bytes": shape_bytes(ins["shape"]),
                "shape": short_shape(ins["shape"]),
                "kind": "argument" if entry_param else "value",
                "instruction": name,
                "op": ins["op"],
                "op_name": _op_name_of(hlo["instructions"], name)[1],
            }
        )
    return sorted(items, key=lambda x: -x["bytes"])[:top]


# ----------------------------------------------------------------------------------------------------------
# XLA's buffer assignment (the dump of this compile)
# ----------------------------------------------------------------------------------------------------------

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*):\s*$")
_VALUE = re.compile(r"^ value: <(\d+) (\S+) @(\d+)> \(size=(\d+),offset=(\d+)\): (.*)$")
_LIVE = re.compile(r"^\s+(\S+): (\d+) bytes")


def _allocation_kind(attrs: str) -> str:
    kinds = []
    if "parameter" in attrs:
        kinds.append("argument")
    if "output shape" in attrs or "maybe-live-out" in attrs:
        kinds.append("output")
    if "thread-local" in attrs:
        kinds.append("thread-local")
    if "constant" in attrs:
        kinds.append("constant")
    return "+".join(kinds) or "temp"


def _dump_files(dump_dir: str) -> dict | None:
    """The buffer-assignment files of the largest module in `dump_dir` (the compiled program)."""
    found = glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt"))
    if not found:
        return None
    main = max(found, key=os.path.getsize)
    live_range = main[: -len("buffer-assignment.txt")] + "live-range.txt"
    return {"assignment": main, **({"live_range": live_range} if os.path.exists(live_range) else {})}


def _instruction(value_name: str) -> str:
    """`fusion.3` of the value names `fusion.3`, `fusion.3{}` and `while.2{0,1}` (tuple elements)."""
    return value_name.split("{", 1)[0]


def buffer_assignment(dump_dir: str, hlo: dict | None = None, top: int = TOP_BUFFERS) -> dict | None:
    """The `top` largest buffers of XLA's buffer assignment in device memory (memory space 0: HBM; on-chip spaces
    such as a TPU's VMEM are left out), the `top` largest temporaries, and the buffers live at the peak of XLA's heap
    simulation. Buffers are the assignment's values; values sharing one slot (same allocation, offset, size and
    shape: a loop carry, an in-place update) are listed once, `aliases` counting the others. Each has size, shape,
    kind (argument, output, temp, ...), the instruction that defines it and, from `hlo` (the optimized module's
    parse), its opcode and op_name metadata: the JAX operation that made it."""
    files = _dump_files(dump_dir)
    if not files:
        return None
    instructions = (hlo or {}).get("instructions", {})
    values: list[dict] = []
    slots: dict[tuple, list[dict]] = {}
    assigned: dict[str, int] = {}  # device-memory allocations by kind
    alloc, kind, color = None, "temp", 0
    with open(files["assignment"]) as f:
        for line in f:
            m = _ALLOCATION.match(line)
            if m:
                alloc, kind = int(m.group(1)), _allocation_kind(m.group(3))
                c = re.search(r"\bcolor (\d+)", m.group(3))
                color = int(c.group(1)) if c else 0
                if color == 0:
                    assigned[kind] = assigned.get(kind, 0) + int(m.group(2))
                continue
            m = _VALUE.match(line)
            if m and alloc is not None and color == 0 and kind != "thread-local":
                _, name, _, size, offset, shape = m.groups()
                v = {"bytes": int(size), "shape": short_shape(shape), "kind": kind, "instruction": name}
                values.append(v)
                slots.setdefault((alloc, int(offset), int(size), v["shape"]), []).append(v)
    distinct = []
    for group in slots.values():
        v = dict(group[0])
        v["aliases"] = len(group) - 1
        distinct.append(v)
    order = lambda v: (-v["bytes"], v["instruction"])  # noqa: E731
    largest = sorted(distinct, key=order)[:top]
    temps = sorted((v for v in distinct if v["kind"] == "temp"), key=order)[:top]
    peak, peak_at = [], None
    if "live_range" in files:
        in_peak = False
        with open(files["live_range"]) as f:
            for line in f:
                if "(peak):" in line:
                    in_peak, peak_at = True, line.strip()
                    continue
                if in_peak:
                    m = _LIVE.match(line)
                    if not m:
                        break
                    peak.append({"instruction": m.group(1), "bytes": int(m.group(2))})
    peak_total = sum(p["bytes"] for p in peak)
    peak = sorted(peak, key=order)[:top]
    by_name: dict[str, dict] = {}
    for v in values:
        by_name.setdefault(v["instruction"].replace("{}", ""), v)
    for p in peak:
        v = by_name.get(p["instruction"].replace("{}", ""))
        if v:
            p.update(shape=v["shape"], kind=v["kind"])
        elif p["instruction"].split("{")[0] in instructions:
            p["shape"] = short_shape(instructions[p["instruction"].split("{")[0]]["shape"])
    for b in largest + temps + peak:
        b["op"], b["op_name"] = _op_name_of(instructions, _instruction(b["instruction"]))
    return {
        "source": "XLA buffer assignment (xla_dump_to of this compile), device memory",
        "largest": largest,
        "largest_temps": temps,
        "assigned_bytes": sum(assigned.values()),
        "assigned_by_kind": assigned,
        "live_range_peak": {"bytes": peak_total, "at": peak_at, "largest": peak, "note": LIVE_RANGE_NOTE},
    }
