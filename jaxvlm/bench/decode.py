"""Prefill and decode throughput of `jaxvlm.sampling.generate`, next to transformers' `generate`.

    python -m jaxvlm.bench.decode --preset small --batch 1,16,64 --prompt_len 64 --new_tokens 64 [--torch]

Both sides load the same random checkpoint (written by jaxvlm, read by transformers' `from_pretrained`) and run
text prompts in float32 with greedy decoding and no stop token, so every row decodes `new_tokens` tokens.
* prefill tokens/s = B * prompt_len / (time of the prompt forward that fills the cache);
* decode tokens/s = B * (new_tokens - 1) / (time of generate(new_tokens) - time of generate(1)), so the
  prefill and the first token are not counted as decoding.
One repeat of a side runs the prompt forward, generate(new_tokens) and generate(1) back to back. After a warm-up
repeat per side (which also compiles; reported apart), the sides' `--repeats` timed repeats alternate (jaxvlm,
transformers, jaxvlm, ...: `jaxvlm.bench.run.interleave`), so a change in the machine's load hits both; the figures
are medians over the repeats, with their min and max.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from jaxvlm import models, sampling

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags, defined only when this module is the program: `main` imports `jaxvlm.bench.run`,
    which imports this module again under its package name."""
    flags.DEFINE_string("preset", "small", "model preset (jaxvlm.models.config.PRESETS)")
    flags.DEFINE_list("batch", ["1", "16", "64"], "batch sizes (rows = prompts, one generation each)")
    flags.DEFINE_integer("prompt_len", 64, "prompt tokens per row")
    flags.DEFINE_integer("new_tokens", 64, "generated tokens per row")
    flags.DEFINE_integer("repeats", 5, "timed repeats per side, interleaved (median reported)")
    flags.DEFINE_bool("torch", True, "also time transformers' generate on the same checkpoint")
    flags.DEFINE_string("out", None, "write the results as JSON here")


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, min(vocab, 4000), (batch, length)).astype(np.int32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids))


def _timings(prefill, generate, new_tokens: int) -> dict[str, float]:
    """One repeat: the prompt forward, generate(new_tokens), generate(1); seconds of each, and decode_s, the time of
    the `new_tokens - 1` decode steps (the difference of the two generates, which run back to back)."""
    t0 = time.perf_counter()
    prefill()
    t1 = time.perf_counter()
    generate(new_tokens)
    t2 = time.perf_counter()
    generate(1)
    t3 = time.perf_counter()
    return dict(prefill_s=t1 - t0, generate_s=t2 - t1, first_token_s=t3 - t2, decode_s=(t2 - t1) - (t3 - t2))


def throughput(batch: dict, new_tokens: int, timed: dict) -> dict:
    """Tokens/s from a side's median seconds (see the module docstring)."""
    rows, length = batch["input_ids"].shape
    return dict(
        prefill_tok_s=rows * length / timed["prefill_s"],
        decode_tok_s=rows * (new_tokens - 1) / max(timed["decode_s"], 1e-9),
    )


class JaxGenerate:
    """jaxvlm's prompt forward and greedy `sampling.generate` on one prompt batch, as a side of
    `jaxvlm.bench.run.interleave`: `prepare()` runs (and so compiles) what a repeat runs; `repeat()` times it."""

    def __init__(self, model, params, batch: dict, new_tokens: int):
        self.model, self.params, self.batch, self.new_tokens = model, params, batch, new_tokens
        self._inputs = sampling.prepare_prompts(model.config, batch)
        self._prefill = jax.jit(
            lambda p, x: model.apply(
                {"params": p},
                x["input_ids"],
                x["attention_mask"],
                None,
                None,
                x["position_ids"],
                method="prefill",
            )
        )

    def prepare(self) -> None:
        self.repeat()

    def repeat(self) -> dict[str, float]:
        return _timings(
            lambda: jax.block_until_ready(self._prefill(self.params, self._inputs)), self._generate, self.new_tokens
        )

    def _generate(self, n: int) -> None:
        out = sampling.generate(
            self.model,
            self.params,
            self.batch,
            jax.random.key(0),
            sampling.SamplingParams(max_new_tokens=n, temperature=0.0, use_eos=False),
        )
        jax.block_until_ready(out)


def load_torch(path: str, dtype: str = "float32"):
    """transformers' model of the checkpoint at `path` (its family's class, `torch_side.load_model`), weights held in
    `dtype`, on CUDA when available."""
    import torch

    from jaxvlm.bench.torch_side import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(path, dtype).to(device).eval()


class TorchGenerate:
    """transformers' prompt forward and greedy `generate` with `model` (`load_torch`) on one prompt batch, as
    `JaxGenerate`."""

    def __init__(self, model, batch: dict, new_tokens: int):
        import torch

        self.model, self.new_tokens = model, new_tokens
        device = model.device
        self._ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
        self._mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=device)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def prepare(self) -> None:
        self.repeat()

    def repeat(self) -> dict[str, float]:
        return _timings(self._prefill, self._generate, self.new_tokens)

    def _prefill(self) -> None:
        import torch

        with torch.no_grad():
            self.model(input_ids=self._ids, attention_mask=self._mask, use_cache=True, logits_to_keep=1)
        self._sync()

    def _generate(self, n: int) -> None:
        import torch

        with torch.no_grad():
            out = self.model.generate(
                input_ids=self._ids,
                attention_mask=self._mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        self._sync()
        assert out.shape[1] == self._ids.shape[1] + n


def _alone(side, batch: dict, new_tokens: int, repeats: int) -> dict:
    from jaxvlm.bench.run import interleave  # (run imports this module)

    timed, _ = interleave({"side": side}, repeats)
    return dict(timed["side"], **throughput(batch, new_tokens, timed["side"]))


def bench_jax(model, params, batch: dict, new_tokens: int, repeats: int) -> dict:
    """The JAX side alone: median seconds, their spread (`timings`), compile_s and tokens/s."""
    return _alone(JaxGenerate(model, params, batch, new_tokens), batch, new_tokens, repeats)


def bench_torch(path: str, batch: dict, new_tokens: int, repeats: int, dtype: str = "float32") -> dict:
    """The transformers side alone, on the checkpoint at `path`."""
    import torch

    result = _alone(TorchGenerate(load_torch(path, dtype), batch, new_tokens), batch, new_tokens, repeats)
    return dict(result, threads=torch.get_num_threads())


def main(argv) -> None:
    del argv
    cfg = models.preset(FLAGS.preset)
    model = models.build_model(cfg)
    params = models.init_params(cfg, 0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    results = dict(
        preset=FLAGS.preset,
        params=int(n_params),
        prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens,
        device=str(jax.devices()[0].device_kind),
        platform=platform.platform(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        rows=[],
    )
    from jaxvlm.bench.run import interleave

    with tempfile.TemporaryDirectory() as tmp:
        torch_model = None
        if FLAGS.torch:
            models.save_pretrained(model, params, tmp)
            torch_model = load_torch(tmp)
        for b in map(int, FLAGS.batch):
            batch = _prompts(b, FLAGS.prompt_len, cfg.text.vocab_size)
            sides = {"jax": JaxGenerate(model, params, batch, FLAGS.new_tokens)}
            if torch_model is not None:
                sides["torch"] = TorchGenerate(torch_model, batch, FLAGS.new_tokens)
            timed, _ = interleave(sides, FLAGS.repeats)
            row = dict(batch=b, **{k: dict(v, **throughput(batch, FLAGS.new_tokens, v)) for k, v in timed.items()})
            results["rows"].append(row)
            _print_row(row)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


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
    _define_flags()
    app.run(main)
