"""Write examples as a JSONL + PNG dataset (the format `jaxvlm.data.jsonl` reads).

    python -m jaxvlm.data.export --out /tmp/gym-jsonl --split train --num_examples 200 [--tasks exists,count]

Useful to look at the gym's examples, to hand them to another tool, or as a template for converting a real
dataset: each line is one example, its images are PNG files next to the JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

from PIL import Image

EXPORTED_FIELDS = (
    "id",
    "question",
    "answer",
    "answer_type",
    "task",
    "reasoning",
    "caption",
    "difficulty",
    "bbox",
    "options",
    "target",
)


def write_jsonl_dataset(
    examples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    name: str = "data.jsonl",
    image_dir: str = "images",
) -> str:
    """Write `examples` to `out_dir/name` with their images as `out_dir/image_dir/<line>_<k>.png`.

    Returns the JSONL path. PNG is lossless, so reading the file back gives bit-identical pixels.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        for line, example in enumerate(examples, start=1):
            record = {field: example[field] for field in EXPORTED_FIELDS if example.get(field) not in (None, "")}
            paths = []
            for k, image in enumerate(example.get("images", ())):
                relative = os.path.join(image_dir, f"{line:07d}_{k}.png")
                Image.fromarray(image).save(os.path.join(out_dir, relative))
                paths.append(relative)
            record["images"] = paths
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> str:
    from jaxvlm.data.gym import TASKS, GymConfig, GymSource

    parser = argparse.ArgumentParser(description="Export gym examples as a JSONL + PNG dataset.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="train", choices=("train", "validation", "test"))
    parser.add_argument("--num_examples", type=int, default=100)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated gym tasks")
    parser.add_argument("--image_size", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = GymConfig(image_size=args.image_size, seed=args.seed, tasks=tuple(args.tasks.split(",")))
    source = GymSource(args.split, args.num_examples, config)
    path = write_jsonl_dataset((source[i] for i in range(len(source))), args.out, name=f"{args.split}.jsonl")
    print(f"wrote {len(source)} examples to {path}")
    return path


if __name__ == "__main__":
    main()
