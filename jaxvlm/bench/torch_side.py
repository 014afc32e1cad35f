"""The PyTorch baseline: transformers' model of the checkpoint's family on the same checkpoint and batch.

The family is config.json's `model_type`, through one mapping (`MODEL_CLASSES`): "qwen2_5_vl" ->
`Qwen2_5_VLForConditionalGeneration`, "qwen3_vl" -> `Qwen3VLForConditionalGeneration`.

What a TRL user runs, written out so both sides do the same work:
* SFT step: completion-only token-mean NLL (TRL's `SFTTrainer` with `completion_only_loss`), gradient accumulation
  over micro-batches, global-norm clipping, `torch.optim.AdamW`.
* GRPO step: `generate` (sampling, `num_return_sequences=G`, every row `max_new_tokens` long), the host reward,
  TRL's group advantages (r - mean) / (std + 1e-4), TRL's clipped surrogate with the "grpo" aggregation (mean over
  sequences of per-sequence token means, / gradient-accumulation steps), AdamW.
* Optionally the SFT step through `torch.compile(model)` (inductor), where it compiles.
Mixed precision as on the JAX side: float32 master weights, `torch.autocast` to bfloat16 when the compute dtype is
bfloat16. With LoRA (`adapter`: a PEFT adapter directory, the JAX side's very adapters written by
`lora.save_peft_adapter`), the model is `peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)`, as a TRL
user's `peft_config` gives it, and AdamW and the clipping see the adapters alone (the parameters left trainable).
`Sft` and `Grpo` at the end are the sides the harness interleaves with the JAX side's (`prepare()`, then `repeat()`
after `repeat()`). Only the benchmarks and the parity tests import this module (jaxvlm itself never needs torch or
peft).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np

from jaxvlm.bench import workload

# config.json's model_type -> transformers' conditional-generation class of that family.
MODEL_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


def _torch():
    import torch

    return torch


def model_class(checkpoint: str):
    """transformers' class for the checkpoint at `checkpoint` (a directory), by its config.json's model_type."""
    path = os.path.join(checkpoint, "config.json")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the checkpoint's config ({type(e).__name__}: {e})") from e
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{path}: model_type {model_type!r} has no PyTorch baseline; known: {', '.join(sorted(MODEL_CLASSES))}"
        )
    import transformers

    return getattr(transformers, MODEL_CLASSES[model_type])


def load_model(checkpoint: str, dtype: str = "float32"):
    """transformers' model of the checkpoint at `checkpoint` (`model_class`), weights held in `dtype`, on the CPU."""
    return model_class(checkpoint).from_pretrained(checkpoint, dtype=getattr(_torch(), dtype))


def load_peft(model, adapter: str):
    """`model` with the PEFT LoRA adapter directory `adapter` on it, trainable (the base frozen)."""
    import peft

    return peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)


class TorchBaseline:
    """transformers' model of `checkpoint` in training mode and its AdamW; `adapter` (a PEFT directory) trains LoRA
    adapters through peft instead of every weight."""

    def __init__(self, checkpoint: str, dtype: str, opt, device: str | None = None, adapter: str | None = None):
        torch = _torch()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.model = load_model(checkpoint, "float32")  # float32 master weights; `_autocast` for bfloat16
        if adapter:
            self.model = load_peft(self.model, adapter)
        self.model.to(self.device).train()
        # What the optimizer updates and the clipping measures: every weight, or with peft the adapters alone.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_cfg = opt
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=opt.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=opt.weight_decay
        )

    @property
    def trainable_params(self) -> int:
        return int(sum(p.numel() for p in self.trainable))

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _autocast(self):
        torch = _torch()
        if self.dtype == "bfloat16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        if self.dtype != "float32":
            raise ValueError(f"the PyTorch baseline runs float32 or bfloat16, not {self.dtype!r}")
        return contextlib.nullcontext()

    def _sync(self):
        torch = _torch()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _tensors(self, ids: np.ndarray, pixel_values, grid) -> dict:
        torch = _torch()
        out = {"input_ids": torch.as_tensor(ids, dtype=torch.long, device=self.device)}
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if pixel_values is not None:
            out["pixel_values"] = torch.as_tensor(pixel_values, device=self.device)
            out["image_grid_thw"] = torch.as_tensor(grid, dtype=torch.long, device=self.device)
            # transformers 5 places image tokens on the M-RoPE grid only when told which tokens are image tokens
            # (the processor's `mm_token_type_ids`); without it every position is 1-D and the model is another one.
            out["mm_token_type_ids"] = (out["input_ids"] == self.model.config.image_token_id).int()
        return out

    def completion_logprobs(self, model, ids: np.ndarray, pixel_values, grid, completion_len: int, temperature=1.0):
        """log π(completion token) float32 [b, N] of rows `ids` [b, S] whose last N tokens are the completion."""
        torch = _torch()
        inputs = self._tensors(ids, pixel_values, grid)
        with self._autocast():
            logits = model(**inputs, logits_to_keep=completion_len + 1, use_cache=False).logits
        logits = logits[:, :-1].float() / temperature
        targets = inputs["input_ids"][:, -completion_len:]
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]

    def _micro(self, rows_ids: np.ndarray, pixel_values, grid, micro_batches: int):
        """Yield (ids, pixels, grid) per micro-batch; images are one per row, `p` patch rows each."""
        b = rows_ids.shape[0] // micro_batches
        p = 0 if pixel_values is None else pixel_values.shape[0] // rows_ids.shape[0]
        for m in range(micro_batches):
            sl = slice(m * b, (m + 1) * b)
            yield (
                rows_ids[sl],
                None if pixel_values is None else pixel_values[m * b * p : (m + 1) * b * p],
                None if grid is None else grid[sl],
            )

    def _apply_update(self) -> float:
        torch = _torch()
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.opt_cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- SFT -------------------------------------------------------------------------------------------------------

    def sft_step(self, rows: workload.Rows, micro_batches: int, model=None) -> tuple[float, float]:
        """One update on `rows`; returns (loss before the update, gradient norm before clipping)."""
        model = self.model if model is None else model  # (an OptimizedModule has no truth value)
        n = rows.seq_len - rows.prompt_len
        total_tokens = rows.num_rows * n
        loss_value = 0.0
        for ids, pixels, grid in self._micro(rows.input_ids, rows.pixel_values, rows.image_grid_thw, micro_batches):
            logp = self.completion_logprobs(model, ids, pixels, grid, n)
            loss = -logp.sum() / total_tokens  # token mean over the whole batch, summed over micro-batches
            loss.backward()
            loss_value += float(loss.detach())
        return loss_value, self._apply_update()

    # -- GRPO ------------------------------------------------------------------------------------------------------

    def generate(self, rows: workload.Rows, num_generations: int, max_new_tokens: int):
        torch = _torch()
        inputs = self._tensors(rows.input_ids, rows.pixel_values, rows.image_grid_thw)
        with torch.no_grad(), self._autocast():
            out = self.model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=num_generations,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=0,
                # as jaxvlm's sampler: never sample an image / video placeholder (random
                # weights would, and the completion could then not be scored)
                suppress_tokens=[self.model.config.image_token_id, self.model.config.video_token_id],
            )
        assert out.shape == (rows.num_rows * num_generations, rows.seq_len + max_new_tokens), out.shape
        return out

    def prefill(self, rows: workload.Rows) -> None:
        torch = _torch()
        inputs = self._tensors(rows.input_ids, rows.pixel_values, rows.image_grid_thw)
        with torch.no_grad(), self._autocast():
            self.model(**inputs, use_cache=True, logits_to_keep=1)

    @staticmethod
    def group_advantages(rewards, num_generations: int):
        """TRL: (r - group mean) / (group std (Bessel) + 1e-4)."""
        grouped = rewards.view(-1, num_generations)
        mean = grouped.mean(1).repeat_interleave(num_generations)
        std = grouped.std(1).repeat_interleave(num_generations)
        return (rewards - mean) / (std + 1e-4)

    def grpo_loss(
        self,
        ids: np.ndarray,
        pixel_values,
        grid,
        completion_len: int,
        advantages,
        old_logp=None,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        model=None,
    ):
        """TRL's `_compute_loss` ("grpo" aggregation, no KL): -min(r A, clip(r, 1-eps_low, 1+eps_high) A), token mean
        per sequence, mean over sequences. old_logp None = the detached current log-probs (num_iterations 1).
        Every completion token is live (generation ran to `max_new_tokens`)."""
        torch = _torch()
        logp = self.completion_logprobs(self.model if model is None else model, ids, pixel_values, grid, completion_len)
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        adv = advantages[:, None]
        per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        return per_token.mean(-1).mean(), logp

    def grpo_update(
        self, ids: np.ndarray, pixel_values, grid, completion_len: int, advantages, micro_batches: int, old_logp=None
    ) -> tuple[float, float]:
        """One update over B*G rows (pixels per row); returns (loss, gradient norm before clipping)."""
        torch = _torch()
        advantages = torch.as_tensor(advantages, dtype=torch.float32, device=self.device)
        b = ids.shape[0] // micro_batches
        total = 0.0
        for m, (mids, pixels, mgrid) in enumerate(self._micro(ids, pixel_values, grid, micro_batches)):
            sl = slice(m * b, (m + 1) * b)
            old = None if old_logp is None else torch.as_tensor(old_logp[sl], device=self.device)
            loss, _ = self.grpo_loss(mids, pixels, mgrid, completion_len, advantages[sl], old)
            (loss / micro_batches).backward()
            total += float(loss.detach()) / micro_batches
        return total, self._apply_update()


# -- the sides the harness interleaves (see `jaxvlm.bench.run.interleave`) ---------------------------------------------


class Sft:
    """The SFT step of `baseline` (eager, or through `torch.compile(model)`), again and again on one batch, as the
    JAX side's `Sft`: `prepare()` runs the first update (torch.compile compiles there), `repeat()` one more and
    returns its seconds; `losses` / `grad_norms` hold every step's, the first included."""

    def __init__(self, baseline: TorchBaseline, rows: workload.Rows, *, micro_batches: int, compile: bool = False):
        self.baseline, self.rows, self.micro_batches, self.compile = baseline, rows, micro_batches, compile
        self.model = baseline.model
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def prepare(self) -> None:
        if self.compile:
            self.model = _torch().compile(self.baseline.model)
        self._update()

    def repeat(self) -> dict[str, float]:
        start = time.perf_counter()
        self._update()
        return {"step_s": time.perf_counter() - start}

    def _update(self) -> None:
        loss, norm = self.baseline.sft_step(self.rows, self.micro_batches, self.model)
        self.baseline._sync()
        self.losses.append(loss)
        self.grad_norms.append(norm)


class Grpo:
    """The GRPO step of `baseline` end to end (`generate`, host reward, TRL's advantages and loss, AdamW), as the JAX
    side's `Grpo`: `prepare()` warms up with one whole step; `repeat()` times the prompt forward alone (`prefill_s`),
    then one step and its phases.

    `parity_batch`, if given, returns the JAX sampler's first update rows (prompt_ids, completion_ids, advantages,
    old_logp): `prepare()` first scores them on the fresh weights (`parity`: the log-probs of those tokens, the GRPO
    loss and gradient norm of one update on them), as the JAX side's first step did; that update is this side's
    first."""

    def __init__(
        self,
        baseline: TorchBaseline,
        rows: workload.Rows,
        *,
        num_generations: int,
        max_new_tokens: int,
        micro_batches: int,
        parity_batch=None,
    ):
        self.baseline, self.rows = baseline, rows
        self.g, self.n, self.micro_batches = num_generations, max_new_tokens, micro_batches
        self.parity_batch = parity_batch
        self.parity: dict = {}
        self._steps = 0

    def prepare(self) -> None:
        if self.parity_batch is not None:
            self.parity = self._score(self.parity_batch())
        self.baseline.prefill(self.rows)
        self._step()

    def repeat(self) -> dict[str, float]:
        start = time.perf_counter()
        self.baseline.prefill(self.rows)
        self.baseline._sync()
        prefill_s = time.perf_counter() - start
        return {"prefill_s": prefill_s, **self._step()}

    def _score(self, first: dict) -> dict:
        torch = _torch()
        b = self.baseline
        ids = np.concatenate([first["prompt_ids"], first["completion_ids"]], axis=1)
        pixels, grid = workload.repeated_pixels(self.rows, self.g)
        with torch.no_grad():
            logp = b.completion_logprobs(b.model, ids, pixels, grid, self.n).float().cpu().numpy()
        loss, norm = b.grpo_update(
            ids,
            pixels,
            grid,
            self.n,
            torch.as_tensor(first["advantages"]),
            self.micro_batches,
            old_logp=first["old_logp"],
        )
        return {"logp": logp, "loss": loss, "grad_norm": norm}

    def _step(self) -> dict[str, float]:
        torch = _torch()
        b, rows = self.baseline, self.rows
        torch.manual_seed(self._steps)
        self._steps += 1
        t0 = time.perf_counter()
        seqs = b.generate(rows, self.g, self.n)
        b._sync()
        t1 = time.perf_counter()
        completions = seqs[:, rows.seq_len :].cpu().numpy()
        rewards = workload.token_parity_reward(completions, np.ones_like(completions))
        advantages = b.group_advantages(torch.as_tensor(rewards, device=b.device), self.g)
        ids = seqs.cpu().numpy()
        pixels, grid = workload.repeated_pixels(rows, self.g)
        t2 = time.perf_counter()
        b.grpo_update(ids, pixels, grid, self.n, advantages, self.micro_batches)
        b._sync()
        t3 = time.perf_counter()
        return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0}
