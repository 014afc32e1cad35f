"""Prefill and decode throughput of `jaxvlm.sampling.generate`, next to transformers' `generate`.

    python -m jaxvlm.bench.decode --preset small --batch 1,16,64 --prompt_len 64 --new_tokens 64 [--torch]

Both sides load the same random checkpoint (written by jaxvlm, read by transformers' `from_pretrained`) and run
text prompts in float32 with greedy decoding and no stop token, so every row decodes `new_tokens` tokens.
* prefill tokens/s = B * prompt_len / (time of the prompt forward that fills the cache);
* decode tokens/s = B * (new_tokens - 1) / (time of generate(new_tokens) - time of generate(1)), so the
  prefill and the first token are not counted as decoding.
Times are medians over `--repeats` runs after a warm-up run (which also compiles); compile time is reported apart.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from jaxvlm import models, sampling
from jaxvlm.models.qwen2_5_vl import Qwen25VL

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "model preset (jaxvlm.models.config.PRESETS)")
flags.DEFINE_list("batch", ["1", "16", "64"], "batch sizes (rows = prompts, one generation each)")
flags.DEFINE_integer("prompt_len", 64, "prompt tokens per row")
flags.DEFINE_integer("new_tokens", 64, "generated tokens per row")
flags.DEFINE_integer("repeats", 3, "timed runs per measurement (median reported)")
flags.DEFINE_bool("torch", True, "also time transformers' generate on the same checkpoint")
flags.DEFINE_string("out", None, "write the results as JSON here")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, min(vocab, 4000), (batch, length)).astype(np.int32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids))


def _throughput(batch: dict, new_tokens: int, t_prefill: float, t_full: float, t_one: float) -> dict:
    """Tokens/s from the three timings (see the module docstring)."""
    rows, length = batch["input_ids"].shape
    return dict(
        prefill_s=t_prefill, generate_s=t_full, first_token_s=t_one,
        prefill_tok_s=rows * length / t_prefill,
        decode_tok_s=rows * (new_tokens - 1) / max(t_full - t_one, 1e-9),
    )


def bench_jax(model, params, batch: dict, new_tokens: int, repeats: int) -> dict:
    inputs = sampling.prepare_prompts(model.config, batch)
    prefill = jax.jit(
        lambda p, x: model.apply(
            {"params": p}, x["input_ids"], x["attention_mask"], None, None, x["position_ids"], method=Qwen25VL.prefill
        )
    )
    start = time.perf_counter()
    jax.block_until_ready(prefill(params, inputs))
    compile_prefill = time.perf_counter() - start
    t_prefill = _median_time(lambda: jax.block_until_ready(prefill(params, inputs)), repeats)

    def gen(n):
        out = sampling.generate(model, params, batch, jax.random.key(0), max_new_tokens=n, temperature=0.0,
                                use_eos=False)
        return jax.block_until_ready(out)

    start = time.perf_counter()
    gen(new_tokens)
    compile_generate = time.perf_counter() - start
    gen(1)
    t_full = _median_time(lambda: gen(new_tokens), repeats)
    t_one = _median_time(lambda: gen(1), repeats)
    return dict(_throughput(batch, new_tokens, t_prefill, t_full, t_one), compile_s=compile_prefill + compile_generate)


def bench_torch(path: str, batch: dict, new_tokens: int, repeats: int, dtype: str = "float32") -> dict:
    """transformers' `generate` on the checkpoint at `path`, weights held in `dtype`, on CUDA when available."""
    import torch
    from transformers import AutoModelForImageTextToText

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        sync()

    def gen(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == ids.shape[1] + n

    prefill(), gen(2)  # warm-up
    t_prefill = _median_time(prefill, repeats)
    t_full = _median_time(lambda: gen(new_tokens), repeats)
    t_one = _median_time(lambda: gen(1), repeats)
    return dict(_throughput(batch, new_tokens, t_prefill, t_full, t_one), threads=torch.get_num_threads())


def main(argv):
    del argv
    cfg = models.preset(FLAGS.preset)
    model = Qwen25VL(cfg)
    params = models.init_params(cfg, 0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    results = dict(
        preset=FLAGS.preset, params=int(n_params), prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens,
        device=str(jax.devices()[0].device_kind), platform=platform.platform(), cpus=os.cpu_count(),
        jax=jax.__version__, rows=[],
    )
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.torch:
            models.save_pretrained(model, params, tmp)
        for b in map(int, FLAGS.batch):
            batch = _prompts(b, FLAGS.prompt_len, cfg.text.vocab_size)
            row = dict(batch=b, jax=bench_jax(model, params, batch, FLAGS.new_tokens, FLAGS.repeats))
            if FLAGS.torch:
                row["torch"] = bench_torch(tmp, batch, FLAGS.new_tokens, FLAGS.repeats)
            results["rows"].append(row)
            _print_row(row)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print_row(row: dict) -> None:
    j, t = row["jax"], row.get("torch")
    line = f"batch {row['batch']:>3}  prefill {j['prefill_tok_s']:>9.0f} tok/s  decode {j['decode_tok_s']:>8.0f} tok/s"
    if t:
        line += (
            f"  | transformers prefill {t['prefill_tok_s']:>9.0f}  decode {t['decode_tok_s']:>8.0f}"
            f"  | ratio prefill {j['prefill_tok_s'] / t['prefill_tok_s']:.2f}x  decode "
            f"{j['decode_tok_s'] / t['decode_tok_s']:.2f}x"
        )
    print(line, flush=True)


if __name__ == "__main__":
    app.run(main)
