"""What watches a training run: the JSON-lines log, the guard that stops a run gone bad, and the
sample replies generated while training. Imported only when training runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from eval.scorers.fact import facts_found
from eval.scorers.text import degenerate
from train.recipe import Recipe

ZERO_GRAD_NORM = 1e-12
"""A gradient norm at or below this is no gradient at all: the run has stopped learning."""


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


class JsonlLog(TrainerCallback):
    """Every log event (train loss, learning rate, val loss) as one JSON line."""

    def __init__(self, log_path: Path):
        self.log_path = log_path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # under `accelerate launch`, one writer
            return
        append_jsonl(
            self.log_path,
            {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **(logs or {})},
        )


class TrainingGuard(TrainerCallback):
    """Stops a run that has gone bad, keeping the message for the caller and `bad_step`, the
    first step whose weights are not to be trusted:
    - divergence: a NaN/inf loss or gradient norm, or a loss `divergence_factor` times the first;
    - collapse: a zero gradient norm at `collapse_logs` logs in a row (the loss then stays frozen
      and replies go empty; a run in that state learns nothing more, however long it goes on).
    Which of the two a too-high learning rate produces depends on the CPU's or GPU's kernels."""

    def __init__(self, divergence_factor: float, collapse_logs: int):
        self.divergence_factor, self.collapse_logs = divergence_factor, collapse_logs
        self.first: float | None = None
        self.problem: str | None = None
        self.bad_step: int | None = None
        self.zero_since: int | None = None
        self.zero_logs = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss, grad_norm = (logs or {}).get("loss"), (logs or {}).get("grad_norm")
        if loss is None:
            return
        step = state.global_step
        if self.first is None and math.isfinite(loss):
            self.first = loss
        if not math.isfinite(loss):
            self.stop(step, f"training loss became {loss} at step {step}")
        elif grad_norm is not None and not math.isfinite(grad_norm):
            # the update just applied was made of NaNs: the weights are gone
            self.stop(step, f"gradient norm became {grad_norm} at step {step}")
        elif self.first is not None and loss > self.divergence_factor * self.first:
            self.stop(
                step,
                f"training loss diverged at step {step}: {loss:.3f} > "
                f"{self.divergence_factor} x the first logged {self.first:.3f}",
            )
        elif grad_norm is not None and grad_norm <= ZERO_GRAD_NORM:
            self.zero_since = step if self.zero_logs == 0 else self.zero_since
            self.zero_logs += 1
            if self.zero_logs >= self.collapse_logs:
                self.stop(
                    self.zero_since,
                    f"training collapsed at step {self.zero_since}: gradient norm 0 "
                    f"at {self.zero_logs} logs in a row, loss frozen at {loss:.3f}",
                )
        else:
            self.zero_logs = 0
        if self.problem:
            control.should_training_stop = True
            control.should_save = False  # the last good checkpoint stays the last one

    def stop(self, bad_step: int, problem: str) -> None:
        if self.problem is None:
            self.problem, self.bad_step = problem, bad_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.problem:  # never save a checkpoint after a bad loss
            control.should_save = False
            control.should_training_stop = True


class Samples(TrainerCallback):
    """The recipe's prompts generated greedily every `every` steps (or "epoch"), checked for
    collapse and under-fitting, and logged."""

    def __init__(
        self, recipe: Recipe, tokenizer, log_path: Path, samples: list[tuple[list[dict], list[str]]]
    ):
        self.every, self.max_new_tokens = recipe.training.sample_steps, recipe.samples.max_new_tokens
        self.tokenizer, self.log_path, self.samples = tokenizer, log_path, samples
        self.last_step: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "epoch" and state.global_step % self.every == 0:
            self.sample(state.global_step, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self.sample(state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.sample(state.global_step, model)

    def on_train_begin(self, args, state, control, **kwargs):
        self.main = state.is_world_process_zero  # under `accelerate launch`, one process samples

    def sample(self, step: int, model) -> None:
        if not self.samples or step == self.last_step or not getattr(self, "main", True):
            return
        self.last_step = step
        replies = generate(model, self.tokenizer, [m for m, _ in self.samples], self.max_new_tokens)
        for n, ((messages, facts), reply) in enumerate(zip(self.samples, replies)):
            flags = []
            if why := degenerate(reply):
                flags.append(f"collapse: {why}")
            missing = [f for f, hit in facts_found(reply, facts).items() if not hit]
            if missing:
                flags.append("under-fitting: facts missing: " + ", ".join(missing))
            append_jsonl(
                self.log_path,
                {
                    "step": step,
                    "sample": n,
                    "prompt": messages[-1]["content"],
                    "reply": reply,
                    "flags": flags,
                },
            )
            for flag in flags:
                print(f"train: step {step}, sample {n}: {flag}")


class CheckpointEvals(TrainerCallback):
    """Hands each evaluation's weights to the checkpoint evaluator (train/checkpoints.py)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def on_train_begin(self, args, state, control, **kwargs):
        self.main = state.is_world_process_zero

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if getattr(self, "main", True):
            self.evaluator(state.global_step, model)


class OverallProgress(TrainerCallback):
    """Advances the whole command's progress bar (eval/estimate.py, `Estimate.overall_bar`) by each
    step's and each evaluation round's share of the training stages' estimate."""

    def __init__(self, bar, step_seconds: float, round_seconds: float):
        self.bar, self.step_seconds, self.round_seconds = bar, step_seconds, round_seconds

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(self.step_seconds)

    def on_evaluate(self, args, state, control, **kwargs):
        self.bar.update(self.round_seconds)


def sample_prompts(recipe: Recipe, data_dir: Path) -> list[tuple[list[dict], list[str]]]:
    """(conversation without the reply, facts it must contain) for every sample prompt."""
    from eval.task import load_items, resolve_task

    out = [
        ([{"role": "user", "content": p}], recipe.samples.facts[n] if recipe.samples.facts else [])
        for n, p in enumerate(recipe.samples.prompts)
    ]
    for spec in recipe.samples.tasks:
        for item in load_items(resolve_task(spec.task, recipe.path.parent), spec.split, data_dir)[
            : spec.count
        ]:
            out.append((item.messages(), list(item.fields.get("facts", []))))
    return out


def make_callbacks(recipe: Recipe, tokenizer, log_path: Path, samples: list[tuple[list[dict], list[str]]]):
    guard = TrainingGuard(recipe.training.divergence_factor, recipe.training.collapse_logs)
    return JsonlLog(log_path), guard, Samples(recipe, tokenizer, log_path, samples)


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies to all conversations as one left-padded batch, model left as it was (a fixed
    set of prompts run the same way by two models gives comparable replies, as the merge parity
    check needs). A reply cut inside a multi-byte character loses the partial character."""
    import torch

    if not conversations:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        ).input_ids
        for m in conversations
    ]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            new = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
    finally:
        model.train(was_training)
    return [strip_partial_char(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in new]


def strip_partial_char(text: str) -> str:
    """A decoded reply without the U+FFFD a byte-level tokenizer leaves where generation stopped
    inside a multi-byte character (only at the end: elsewhere it is the model's own output)."""
    return text.rstrip("\ufffd")
