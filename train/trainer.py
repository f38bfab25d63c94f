"""The thin trainer: our data path, recipe and checks around transformers' Trainer and peft.

    python -m selectune train --recipe train/default.yaml      # make train

The optimiser loop, checkpointing, resume (same data order: the sampler is seeded and Trainer
skips the batches already seen) and `accelerate launch` on several GPUs are transformers'. Ours:
- the data (train/data.py, train/prepare.py): read, clean with a report, split, template,
  assistant-only labels;
- the model: NF4 with double quantisation (or 8-bit, or none), prepare_model_for_kbit_training,
  LoRA on the architecture's attention and MLP projections;
- a padding collator, length-grouped batches, the label-only loss (train/kernels.py);
- the callbacks (train/callbacks.py) and, on a CPU, the allocator (train/cpu_memory.py).
Imported only when training runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from core.errors import UserError
from core.workspace import TrainRun
from train.callbacks import make_callbacks, sample_prompts
from train.cpu_memory import CpuAllocator
from models.loading import cpu_has_bf16
from train.prepare import Example, PreparedData, ensure_chat_template, prepare_data
from train.kernels import fuse_lora_dropout, fuse_silu_mlps, label_only_loss
from train.merge import load_base, load_merge_base
from train.recipe import Recipe, target_modules
from train.resume import drop_checkpoints_from, finished, last_complete_checkpoint, truncate_log


class PadCollator:
    """Right-pads a batch; padded positions get attention 0 and label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SeededLengthGroupedSampler:
    """transformers' length grouping (megabatches of similar lengths, longest first), with the
    order drawn from (seed, epoch) alone. Its own sampler draws from the global RNG, whose state
    a mid-epoch checkpoint saves after the epoch's order was drawn: a resumed run then reorders
    the rest of the epoch. Trainer calls set_epoch at every epoch start."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class ThinTrainer(Trainer):
    """transformers' Trainer with the label-only loss and the seeded length-grouped sampler."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _ = label_only_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's labels and DDP averages the gradients over
            # processes: scale back up, as Trainer's own compute_loss does
            loss = loss * self.accelerator.num_processes
        # Evaluation reads the loss only (prediction_loss_only): no logits are kept.
        return (loss, {}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        # grouped by the global batch: under `accelerate launch` each process takes its share of
        # it, so N processes see the batches one process would
        return SeededLengthGroupedSampler(
            [len(e.input_ids) for e in dataset.examples],
            self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size,
            self.args.seed,
        )


class ExampleDataset:
    """A map-style dataset of tokenised examples (what Trainer's samplers and collator read)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


# ---------------------------------------------------------------------------------------------
# Model


def compute_dtype(recipe: Recipe):
    if recipe.compute_dtype == "bf16":
        return torch.bfloat16
    if recipe.compute_dtype == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def load_for_training(recipe: Recipe, checkpoint: str, trust_remote_code: bool):
    """The base model quantised as the recipe says, prepared for k-bit training, with LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype = compute_dtype(recipe)
    model = load_base(checkpoint, recipe.quantization, dtype, trust_remote_code)
    if recipe.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.training.gradient_checkpointing:
        # transformers' selective checkpointing: every n-th decoder layer recomputes its activations
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=recipe.training.checkpoint_every_n_layers
        )
    config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=target_modules(recipe, model.config.model_type),
        modules_to_save=list(recipe.lora.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    final_train_loss: float | None
    final_val_loss: float | None
    steps: int
    seconds: float
    data: PreparedData
    resumed_from: str | None
    checkpoint_choice: dict | None = None
    """train/checkpoints.py's record; None without probe entries."""
    merge_adapter_dir: Path | None = None
    """The chosen checkpoint's adapter (adapter_dir when the final one)."""


def training_arguments(recipe: Recipe, out_dir: Path, *, evaluate: bool = True):
    from transformers import TrainingArguments

    t = recipe.training
    dtype = compute_dtype(recipe)
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler if t.scheduler == "cosine" else "constant_with_warmup",
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy=("epoch" if t.eval_steps == "epoch" else "steps") if evaluate else "no",
        eval_steps=None if t.eval_steps == "epoch" else t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=recipe.seed,
        data_seed=recipe.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=dtype == torch.bfloat16,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        prediction_loss_only=True,
        # (gradient checkpointing is set up on the model, by load_for_training)
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def final_val_loss(trainer) -> float:
    """The val loss of the final weights: Trainer evaluates at the last step when the eval
    schedule is on (not again here: on the default job that is half a minute), else now."""
    state = trainer.state
    last = [h for h in state.log_history if "eval_loss" in h]
    if last and last[-1].get("step") == state.global_step:
        return last[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def run_training(
    recipe: Recipe,
    checkpoint: str,
    run_dir: Path,
    data_dir: Path,
    *,
    trust_remote_code: bool = False,
    synth_root: Path | None = None,
    eval_texts: list | None = None,
    probe: list | None = None,
    probe_card=None,
    progress=None,
) -> TrainResult:
    """Train (or resume) the adapter into run_dir/adapter; logs in run_dir/train_log.jsonl.
    `probe`: entries scored at every evaluation (train/checkpoints.py), rendered as `probe_card`.
    `progress`: a callback that advances the whole command's progress bar."""
    from transformers import AutoTokenizer, set_seed

    allocator = None if torch.cuda.is_available() else CpuAllocator(recipe.training.cpu_allocator)

    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if ensure_chat_template(tokenizer):
        print("train: the base model has no chat template; using the Alpaca layout (saved with the adapter)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(recipe, tokenizer, data_dir, run_dir, synth_root, eval_texts)
    set_seed(recipe.seed)  # LoRA's A matrices are drawn before Trainer seeds anything
    if allocator:
        allocator.before_load()
    model = load_for_training(recipe, checkpoint, trust_remote_code)
    if allocator:
        allocator.after_load()
    fuse_silu_mlps(model)
    fuse_lora_dropout(model)
    layout = TrainRun(run_dir)
    checkpoints, log_path = layout.checkpoints, layout.log
    last = last_complete_checkpoint(checkpoints)
    if last:
        print(f"train: resuming from {last}")
        truncate_log(log_path, int(last.name.rsplit("-", 1)[1]))
    elif log_path.exists():
        log_path.unlink()  # no checkpoint to resume from: start the log afresh
    log, guard, sampler = make_callbacks(recipe, tokenizer, log_path, sample_prompts(recipe, data_dir))
    callbacks = (
        [log, guard, sampler]
        + ([allocator.callback()] if allocator else [])
        + ([progress] if progress else [])
    )
    evaluator = None
    if probe:
        from train.callbacks import CheckpointEvals
        from train.checkpoints import Evaluator

        evaluator = Evaluator(
            probe,
            tokenizer,
            probe_card,
            run_dir,
            data_dir,
            lambda: load_merge_base(checkpoint, recipe.merge_base, recipe.quantization, trust_remote_code),
            log_path,
            int(last.name.rsplit("-", 1)[1]) if last else None,
            {"merge_base": recipe.merge_base, "quantization": recipe.quantization},
        )
        callbacks.append(CheckpointEvals(evaluator))
    trainer = ThinTrainer(
        model=model,
        args=training_arguments(recipe, checkpoints, evaluate=bool(data.val)),
        train_dataset=ExampleDataset(data.train),
        eval_dataset=ExampleDataset(data.val) if data.val else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    started = time.monotonic()
    if last and finished(last):
        # Trainer resumed at max_steps still runs one more step (it checks after a step, not
        # before): load the finished checkpoint's weights and state instead.
        from transformers.trainer_callback import TrainerState

        print(f"train: {last} finished the schedule; nothing left to train")
        trainer._load_from_checkpoint(str(last))
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.monotonic() - started
    if guard.problem:
        drop_checkpoints_from(checkpoints, guard.bad_step)
        kept = last_complete_checkpoint(checkpoints)
        raise UserError(
            f"{guard.problem}; stopped. Last good checkpoint: {kept or 'none yet'} "
            f"(lower training.learning_rate in {recipe.path} and rerun)"
        )
    val_loss = final_val_loss(trainer) if data.val else None
    adapter_dir = layout.adapter
    if trainer.is_world_process_zero():  # under `accelerate launch`, the main process saves
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    choice, chosen = None, adapter_dir
    if evaluator and trainer.is_world_process_zero():
        evaluator(trainer.state.global_step, model)  # when the last step had no evaluation
        choice, chosen = evaluator.choose(trainer.state.global_step, adapter_dir)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainResult(
        run_dir,
        adapter_dir,
        history[-1] if history else None,
        val_loss,
        trainer.state.global_step,
        seconds,
        data,
        str(last) if last else None,
        choice,
        chosen,
    )
