"""Checkpoints chosen by evidence: the recipe's checks and the suite's `check` and `forgetting`
entries scored at every evaluation during training, and the checkpoint that is merged chosen by
a paired test against the final one.

At each evaluation (`training.eval_steps`, and always at the end) the adapter is saved under
run_dir/checkpoint_evals/step-N/adapter and merged in memory into the base it will be merged into
after training (the recipe's `merge_base`), and that model, the one that would ship, scores the
probe entries: greedy, left-padded batches as `make select` runs them (eval/runner.py). Per-item
scores go to step-N/scores.json (written last: a step without it is not evaluated), the means to
train_log.jsonl (the training page draws them as curves).

The choice: every earlier evaluated step is compared with the final one on every `check` entry,
item by item (exact McNemar for 0/1 metrics, paired bootstrap otherwise), the p-values
Holm-adjusted over all those comparisons. A step is eligible when it is significantly better on
at least one check entry after adjustment and significantly worse on none, nor on any
`forgetting` entry (unadjusted, which keeps the final one more often). The eligible step with the
largest mean gain over the check entries is merged; with none, the final one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.artifacts import CheckpointScores, read_artifact, write_artifact
from core.workspace import TrainRun


@dataclass
class ProbeEntry:
    """One task split scored at every checkpoint evaluation."""

    key: str
    task: object
    """The TaskSpec."""
    split: str
    mode: str
    metric: str
    role: str
    """check (chooses the checkpoint) or forgetting (may only veto one)."""
    items: list
    complete: bool
    """Every item of the split (no max_items cut)."""


def probe_entries(recipe, selection: dict | None, data_dir: Path) -> list[ProbeEntry]:
    """The recipe's checks, then the selection suite's `check` and `forgetting` entries (any mode,
    not circular), each split cut to `checkpoint_selection.max_items` items in a seeded order."""
    from eval.metrics import ranked_metric
    from eval.runner import sequential_order
    from eval.suite import entries_with_role
    from eval.task import load_items, resolve_task

    specs = [
        (resolve_task(c.task, recipe.path.parent), c.split, c.mode, c.metric, "check") for c in recipe.checks
    ]
    for role in ("check", "forgetting"):
        specs += [
            (task, e.split, e.mode, e.metric, role)
            for task, e in entries_with_role(selection, role)
            if not e.circular
        ]
    out, seen = [], set()
    limit = recipe.checkpoint_selection.max_items
    for task, split, mode, metric, role in specs:
        if (task.path, split, mode) in seen:
            continue
        seen.add((task.path, split, mode))
        items = load_items(task, split, data_dir)
        kept = items if limit is None or len(items) <= limit else sequential_order(items, recipe.seed)[:limit]
        metric = ranked_metric(task, mode, metric)
        out.append(
            ProbeEntry(
                f"{task.name}-{split}-{mode}", task, split, mode, metric, role, kept, len(kept) == len(items)
            )
        )
    return out


def score_entries(
    model, tokenizer, card, entries: list[ProbeEntry], data_dir: Path, limit: int | None = None
) -> dict[str, list[tuple[str, dict]]]:
    """(output, metrics) per item of every entry, for a model in memory (left in eval mode)."""
    from eval.backends.hf import HFBackend
    from eval.runner import load_scorer, score_in_memory

    backend = HFBackend.from_model(card, model, tokenizer)
    return {
        e.key: score_in_memory(backend, e.task, e.mode, e.items[:limit], load_scorer(e.task, data_dir))
        for e in entries
    }


def evaluated_steps(run_dir: Path, basis: dict | None = None) -> dict[int, CheckpointScores]:
    """step -> its scores.json record, for every finished checkpoint evaluation (made on `basis`,
    when given: what else than the weights decides the scores)."""
    out, layout = {}, TrainRun(run_dir)
    for path in (layout.evaluation_scores(step) for step in layout.evaluation_steps()):
        if not path.is_file():
            continue
        record = read_artifact(path, CheckpointScores)
        if basis is None or record.basis == basis:
            out[record.step] = record
    return out


def evaluation_basis(entries: list[ProbeEntry], merge: dict) -> dict:
    """What decides an evaluation's scores besides the adapter: how it is merged (`merge`: the
    recipe's merge_base and quantization) and each entry's metric and items."""
    return {**merge, "entries": {e.key: [e.metric, [i.id for i in e.items]] for e in entries}}


def drop_evaluations_after(run_dir: Path, step: int) -> None:
    """Remove the evaluations of steps after `step` (a resumed run trains them again)."""
    for later, path in TrainRun(run_dir).evaluation_steps().items():
        if later > step:
            shutil.rmtree(path)


def evaluate_checkpoint(
    step: int,
    model,
    tokenizer,
    card,
    entries: list[ProbeEntry],
    run_dir: Path,
    data_dir: Path,
    base_loader,
    basis: dict,
) -> dict:
    """Save the adapter at `step` (model None: score the one saved there before), merge it in
    memory into `base_loader()` and score the entries."""
    import gc

    import torch
    from peft import PeftModel

    from models import prepack

    layout = TrainRun(run_dir)
    adapter, scores_file = layout.evaluation_adapter(step), layout.evaluation_scores(step)
    scores_file.unlink(missing_ok=True)
    if model is not None:
        shutil.rmtree(adapter, ignore_errors=True)
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)

    with torch.random.fork_rng(devices=[]):  # loading draws from torch's RNG: training must not notice
        merged = PeftModel.from_pretrained(base_loader(), adapter).merge_and_unload().eval()
        if prepack.available():
            prepack.prepack_linears(merged, 16)
        scored = score_entries(merged, tokenizer, card, entries, data_dir)
    del merged
    gc.collect()
    record = {
        "step": step,
        "adapter": str(adapter),
        "basis": basis,
        "entries": {
            e.key: {
                "metric": e.metric,
                "role": e.role,
                "ids": [i.id for i in e.items],
                "scores": [s[e.metric] for _, s in scored[e.key]],
                "outputs": [o for o, _ in scored[e.key]],
            }
            for e in entries
        },
    }
    return write_artifact(scores_file, CheckpointScores, record)


def means(record: CheckpointScores) -> dict[str, float]:
    return {k: sum(v["scores"]) / len(v["scores"]) for k, v in record.entries.items() if v["scores"]}


def choose_checkpoint(evaluations: dict[int, CheckpointScores], final_step: int) -> dict:
    """The checkpoint to merge and why (the module docstring has the rule)."""
    from statsmodels.stats.multitest import multipletests

    from eval import metrics as M
    from eval.stats import ALPHA, compare

    curves = {}
    for step in sorted(evaluations):
        for key, mean in means(evaluations[step]).items():
            curves.setdefault(key, []).append({"step": step, "mean": mean})
    base = {"final_step": final_step, "curves": curves, "comparisons": []}
    if final_step not in evaluations:
        return {
            **base,
            "chosen_step": final_step,
            "reason": f"the final step ({final_step}) was not evaluated; it is merged",
        }
    final = evaluations[final_step].entries
    comparisons = []
    for step in sorted(s for s in evaluations if s != final_step):
        for key, entry in evaluations[step].entries.items():
            if key not in final or len(entry["scores"]) != len(final[key]["scores"]) or not entry["scores"]:
                continue
            comp = compare(entry["scores"], final[key]["scores"], binary=entry["metric"] in M.BINARY)
            gain = comp.diff if M.HIGHER_IS_BETTER[entry["metric"]] else -comp.diff
            comparisons.append(
                {
                    "step": step,
                    "entry": key,
                    "role": entry["role"],
                    "gain": gain,
                    **comp.record(entry["metric"]),
                }
            )
    checks = [c for c in comparisons if c["role"] == "check"]
    if checks:
        adjusted = multipletests([c["p_value"] for c in checks], alpha=ALPHA, method="holm")[1]
        for c, p in zip(checks, adjusted):
            c["p_holm"] = float(p)
    if not comparisons:
        return {
            **base,
            "chosen_step": final_step,
            "reason": f"only the final step ({final_step}) was evaluated; it is merged",
        }
    eligible = []
    for step in sorted({c["step"] for c in comparisons}):
        mine = [c for c in comparisons if c["step"] == step]
        wins = [c for c in mine if c["role"] == "check" and c["better"] and c["p_holm"] < ALPHA]
        losses = [c for c in mine if c["significant"] and not c["better"]]
        if wins and not losses:
            checks = [c["gain"] for c in mine if c["role"] == "check"]
            gain = sum(checks) / max(1, len(checks))
            eligible.append((gain, step, wins))
    base["comparisons"] = comparisons
    if not eligible:
        best = max(checks, key=lambda c: c["gain"], default=None)
        detail = (
            ""
            if best is None
            else (
                f"; the largest gain was step {best['step']} on {best['entry']}, "
                f"{best['metric']} {best['diff']:+.3f} (Holm p={best['p_holm']:.3g})"
            )
        )
        return {
            **base,
            "chosen_step": final_step,
            "reason": f"the final step ({final_step}) is merged: no earlier checkpoint is significantly "
            f"better on the checks without being worse anywhere{detail}",
        }
    gain, step, wins = max(eligible)
    detail = ", ".join(
        f"{c['entry']} {c['metric']} {c['diff']:+.3f} (Holm p={c['p_holm']:.3g})" for c in wins
    )
    return {
        **base,
        "chosen_step": step,
        "reason": f"step {step} is merged instead of the final step ({final_step}): significantly better "
        f"on {detail}, and not significantly worse on any check or forgetting probe",
    }


class Evaluator:
    """The trainer's hook: evaluates each step once (a resumed run keeps the evaluations up to the
    checkpoint it resumes from), logs the means, and finally chooses."""

    def __init__(
        self,
        entries: list[ProbeEntry],
        tokenizer,
        card,
        run_dir: Path,
        data_dir: Path,
        base_loader,
        log_path: Path,
        resumed_step: int | None,
        merge: dict,
    ):
        self.entries, self.tokenizer, self.card, self.run_dir = entries, tokenizer, card, run_dir
        self.data_dir, self.base_loader, self.log_path = data_dir, base_loader, log_path
        self.basis = evaluation_basis(entries, merge)
        if resumed_step is None:
            shutil.rmtree(TrainRun(run_dir).evaluations, ignore_errors=True)
        else:
            drop_evaluations_after(run_dir, resumed_step)

    def __call__(self, step: int, model, log: bool = True) -> None:
        if step in evaluated_steps(self.run_dir, self.basis):
            return
        from train.callbacks import append_jsonl

        record = evaluate_checkpoint(
            step,
            model,
            self.tokenizer,
            self.card,
            self.entries,
            self.run_dir,
            self.data_dir,
            self.base_loader,
            self.basis,
        )
        found = means(record)
        if log:
            append_jsonl(self.log_path, {"step": step, "checkpoint_eval": found})
        print(
            f"train: step {step} checkpoint evaluation: "
            + ", ".join(f"{k} {record.entries[k]['metric']} {v:.3f}" for k, v in found.items())
        )

    def choose(self, final_step: int, final_adapter: Path) -> tuple[dict, Path]:
        """(the choice record, the adapter to merge). Evaluations a rerun with another recipe
        made stale (another merge base, other probe items) are scored again from their adapters."""
        layout = TrainRun(self.run_dir)
        for step in layout.evaluation_steps():
            if (
                layout.evaluation_adapter(step).is_dir()
                and step <= final_step
                and step not in evaluated_steps(self.run_dir, self.basis)
            ):
                self(step, None, log=False)
        choice = choose_checkpoint(evaluated_steps(self.run_dir, self.basis), final_step)
        step = choice["chosen_step"]
        adapter = final_adapter if step == final_step else layout.evaluation_adapter(step)
        return {**choice, "adapter": str(adapter)}, adapter
