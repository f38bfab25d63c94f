"""`make train`: fine-tune the selected model, merge, check parity, and run the recipe's checks.

    python -m selectune train                                  # train/default.yaml, the winner
    python -m selectune train --recipe train/quick.yaml --model smollm2-135m-instruct

Writes runs/train/<run>/: data/{train,val,test}.jsonl (the split), train_log.jsonl (losses,
learning rate, samples and their flags), checkpoints/, adapter/, merged/ (with provenance.json)
and summary.json (last, so a run without it is not complete). A rerun resumes training from the
last checkpoint; the merge and the fact check run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from core.errors import UserError
from core.artifacts import TrainSummary, write_artifact
from core.files import sha256_file
from core.settings import Settings
from core.workspace import TrainRun, Workspace
from train.checks import all_checks, check_comparison, chosen_scores, with_suite_samples
from train.recipe import Recipe


def resolve_model(recipe: Recipe, override: str | None, workspace: Workspace) -> str:
    if override:
        return override
    if recipe.model:
        return recipe.model
    try:
        return workspace.winner()
    except UserError as exc:
        raise UserError(f"{exc} (--model, or `model:` in {recipe.path})") from None


def train_command(
    settings: Settings,
    recipe: Recipe,
    model_name: str | None,
    run_name: str | None,
    workers: int = 1,
    estimate=None,
) -> dict:
    """`estimate` (train/estimate.py): a second progress bar shows the time left for the whole command."""
    from eval.progress import OverallBar

    overall = OverallBar(estimate) if estimate is not None else None
    try:
        return _train(settings, recipe, model_name, run_name, workers, estimate, overall)
    finally:
        if overall is not None:
            overall.close()


def _train(
    settings: Settings,
    recipe: Recipe,
    model_name: str | None,
    run_name: str | None,
    workers: int,
    estimate,
    overall,
) -> dict:
    from eval.results import open_results
    from models.card import find_card
    from models.store import provision
    from train.merge import merge_adapter
    from train.trainer import run_training

    if workers > 1 and settings.executor != "ray":
        raise UserError(
            f"--workers {workers}: several training workers run on the Ray executor (--executor "
            "ray; or `accelerate launch`, docs/training.md)"
        )
    recipe = with_suite_samples(recipe, settings)
    card = find_card(resolve_model(recipe, model_name, settings.workspace))
    manifest = provision(card, settings.model_store)
    run_dir = settings.workspace.train_run(run_name or f"{recipe.name}-{card.name}")
    summary_path = settings.workspace.train_summary(run_dir)
    print(f"train: {card.name} with {recipe.path} into {run_dir}")
    started = time.monotonic()
    from train.contamination import evaluation_texts

    from train.checkpoints import probe_entries, score_entries

    selection = settings.workspace.read_selection()
    texts = evaluation_texts(recipe, selection, settings.resolved_data_dir)
    merged_card = card.model_copy(
        update={"name": f"{card.name}+{run_dir.name}", "chat_template": "tokenizer", "add_bos": False}
    )
    probe = probe_entries(recipe, selection, settings.resolved_data_dir)
    options = dict(
        trust_remote_code=card.trust_remote_code,
        synth_root=settings.workspace.synth_root,
        eval_texts=texts,
        probe=probe if recipe.checkpoint_selection.enabled else None,
        probe_card=merged_card,
    )
    trained = 0.0  # the training stages' share of the estimate, which the trainer's steps advance
    if overall is not None:
        from train.callbacks import OverallProgress

        training = estimate.stage_seconds("training")
        trained = (
            training
            + estimate.stage_seconds("evaluations")
            + estimate.stage_seconds("checkpoint evaluations")
        )
        options["progress"] = OverallProgress(
            overall, training / estimate.counts["steps"], (trained - training) / estimate.counts["rounds"]
        )
    fresh = not run_dir.exists()
    try:
        if settings.executor == "ray":
            from train.cluster import train_on_ray

            result = train_on_ray(
                settings,
                recipe,
                manifest["checkpoint"],
                run_dir,
                settings.resolved_data_dir,
                workers=workers,
                memory_gib=card.memory_gib.qlora_train,
                **options,
            )
        else:
            result = run_training(
                recipe, manifest["checkpoint"], run_dir, settings.resolved_data_dir, **options
            )
    except UserError:
        # Refused before any checkpoint (bad data, contamination, an early divergence): leave nothing.
        if fresh and not any(TrainRun(run_dir).checkpoints.glob("checkpoint-*")):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if overall is not None:  # a resumed run trained part of it
        overall.update(max(0.0, trained + sum(estimate.loads.values()) - overall.n))
    if estimate is not None and result.resumed_from is None and settings.executor == "local":
        _learn(settings, recipe, run_dir, estimate)
    if (choice := result.checkpoint_choice) is not None:
        print(
            f"checkpoint: merging step {choice['chosen_step']} of {choice['final_step']}: {choice['reason']}"
        )
    checked = [e for e in probe if e.role == "check"]
    merged_dir = settings.workspace.merged_model(run_dir)
    prompts = [c.messages[:-1] for c in (result.data.split["val"] or result.data.split["train"])]
    prompts = prompts[: recipe.parity.items]
    provenance = {
        "base_card": card.name,
        "base_weights_sha256": manifest.get("weights_sha256"),
        "adapter_config": json.loads(
            (result.adapter_dir / "adapter_config.json").read_text(encoding="utf-8")
        ),
        "adapter_sha256": sha256_file(
            (result.merge_adapter_dir or result.adapter_dir) / "adapter_model.safetensors"
        ),
        "data_sha256": result.data.sha256,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": sha256_file(recipe.path) if recipe.path.is_file() else None,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "steps": result.steps,
        "checkpoint_step": result.checkpoint_choice["chosen_step"]
        if result.checkpoint_choice
        else result.steps,
    }
    from train.trainer import compute_dtype

    adapter = result.merge_adapter_dir or result.adapter_dir
    n_tasks = recipe.parity.task_items
    parity = merge_adapter(
        manifest["checkpoint"],
        adapter,
        merged_dir,
        parity_prompts=prompts,
        max_new_tokens=recipe.parity.max_new_tokens,
        tolerance=recipe.parity.tolerance,
        provenance=provenance,
        trust_remote_code=card.trust_remote_code,
        quantization=recipe.quantization,
        compute_dtype=compute_dtype(recipe),
        merge_base=recipe.merge_base,
        task_scorer=(
            lambda model, tok: score_entries(
                model, tok, merged_card, checked, settings.resolved_data_dir, n_tasks
            )
        )
        if n_tasks and checked
        else None,
        task_metrics={e.key: e.metric for e in checked},
    )
    if overall is not None:
        overall.update(estimate.stage_seconds("merge"))
    print(
        f"merge: parity {parity.same_replies}/{parity.items} identical greedy replies, max logit "
        f"difference {parity.max_abs_logit_diff:.2e} (tolerance {parity.tolerance:.0e})"
    )
    for name, a in (parity.three_way or {}).items():
        if isinstance(a, dict) and name != "tasks":
            print(
                f"merge: {name.replace('_', ' ')}: {a['same_replies']}/{a['items']} identical replies, "
                f"top-1 agreement {a['top1_agreement']:.1%}, max logit difference {a['max_abs_logit_diff']:.2e}"
            )
    from eval.summary import fmt_diff, fmt_p, fmt_value

    for name, rows in ((parity.three_way or {}).get("tasks") or {}).items():
        for r in rows:
            print(
                f"merge: {name.replace('_', ' ')} on {r['entry']} ({r['items']} items): {r['same_outputs']} "
                f"identical outputs, {r['metric']} difference {fmt_diff(r['metric'], r['diff'])}, "
                f"p {fmt_p(r['p_value'])}"
            )

    checks = []
    for check, role in all_checks(recipe, settings):
        checks.append(
            {
                **check_comparison(
                    check,
                    recipe.path.parent,
                    card,
                    merged_card,
                    merged_dir,
                    settings,
                    open_results(settings.runs_dir),
                    chosen_scores(result, check, recipe),
                ),
                "role": role,
            }
        )
        if overall is not None:
            c = checks[-1]
            overall.update(estimate.stage_seconds(f"{role}: {c['task']}-{c['split']} {c['mode']}"))
    for c in checks:
        m = c["metric"]
        probe = "forgetting probe " if c["role"] == "forgetting" else ""
        print(
            f"{probe}{c['task']}-{c['split']} {m} ({c['items']} items): base {fmt_value(m, c['base']['mean'])}, "
            f"merged {fmt_value(m, c['merged']['mean'])}, difference {fmt_value(m, c['diff'])} "
            f"[{fmt_value(m, c['ci95'][0])}, {fmt_value(m, c['ci95'][1])}], p={c['p_value']:.3g}: {c['verdict']}"
        )
    summary = {
        "model": card.name,
        "merged_model": merged_card.name,
        "recipe": str(recipe.path),
        "run_dir": str(run_dir),
        "adapter": str(result.adapter_dir),
        "merged": str(merged_dir),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "resumed_from": result.resumed_from,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "cleaning": {k: v for k, v in asdict(result.data.report).items() if k != "problems"},
        "parity": {**asdict(parity), "passed": parity.passed},
        "checks": checks,
        "contamination": result.data.contamination,
        "checkpoint": result.checkpoint_choice,
    }
    write_artifact(summary_path, TrainSummary, summary)
    print(f"wrote {summary_path}")
    return summary


def _learn(settings, recipe, run_dir, estimate) -> None:
    """Keep the steps' measured time over the estimate's for the next estimates (eval/learned.py)."""
    import json

    from eval.learned import learn_training
    from models.machine import calibration
    from train.trainer import compute_dtype

    dtype = str(compute_dtype(recipe)).removeprefix("torch.")
    log = [json.loads(line) for line in TrainRun(run_dir).log.read_text().splitlines() if line.strip()]
    training, steps = estimate.stage_seconds("training"), estimate.counts["steps"]
    factor = learn_training(settings, calibration(settings.cache_dir), log, training, steps, dtype)
    if factor is not None:
        print(
            f"train: its steps took x{factor:.2f} the cost model's estimate; kept for the next estimates here"
        )
