"""A small but complete runs/ directory for the report and review tests.

Real task files (fewclue_bustm from ../shared/data or tests/fixtures/data, style and fact from the project's own data),
scored by fake backends through the real runner, selection, parity and file layouts: two
candidates, a merged model scored locally and "served", a training run with its log. With
`evil=True`, dataset and model text carries script tags, attribute-breaking quotes and
`</textarea>`, to show they render inert.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from core.artifacts import (
    CheckpointScores,
    MergeProvenance,
    RescoreRecord,
    Selection,
    TrainSummary,
    write_artifact,
)
from eval.backends.fake import FakeBackend
from eval.results import open_results
from eval.runner import run_task
from eval.decision import Budget, Candidate, selection_report
from eval.task import find_task, load_items
from models.card import find_card

EVIL = (
    '<script>window.__pwned=1</script>"\'><img src=x onerror="window.__pwned=2">'
    '</textarea></pre><svg onload="window.__pwned=3"></svg>'
)

WINNER, OTHER = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
MERGED = f"{WINNER}@merged"
ENTRIES = [("fewclue_bustm", "dev", 24), ("style", "test", 12), ("fact", "test", 12)]

PAGES = ("index", "leaderboard", "before_after", "training", "serving", "review")
"""The pages a report has once (flips and samples pages come one a task)."""


def _items(data_dir: Path):
    return {
        name: (find_task(name), split, load_items(find_task(name), split, data_dir)[:n])
        for name, split, n in ENTRIES
    }


def _responder(items, system: str, evil: bool):
    by_user = {i.messages()[-1]["content"]: (k, i) for k, i in enumerate(items)}

    def respond(request):
        k, item = by_user[request.messages[-1]["content"]]
        if item.gold in ("A", "B"):  # FewCLUE: the base is right on 2 of 3, the merged on 3 of 4
            right = {"base": k % 3 != 0, "merged": k % 4 != 0, "other": k % 6 == 0}[system]
            reply = f"答：{item.gold if right else ('B' if item.gold == 'A' else 'A')}"
        elif system == "merged" and k % 5 != 4:
            reply = item.gold  # the reference reply: right style, every fact
        else:
            reply = {"base": "好的，我明白了。", "other": "嗯。"}.get(system, "不知道。")
        return reply + (EVIL if evil and k % 4 == 1 else "")

    return respond


def build_in(folder: Path, *, evil: bool = False, votes: bool = False) -> Path:
    """`build` into folder/runs from the public data beside the checkout, else from the project's
    fixtures of its shape; with `votes`, `add_votes` too. Returns the runs directory."""

    from tests.conftest import FIXTURE_DATA, public_data

    runs = folder / "runs"
    build(runs, public_data(fallback=FIXTURE_DATA), evil=evil)
    if votes:
        add_votes(runs)
    return runs


def build(runs_dir: Path, data_dir: Path, *, evil: bool = False) -> dict:
    """Write runs_dir/{results.sqlite, selection.json, train/..., serve/rescore-*.json}."""
    from serve.parity import parity

    suite = _items(data_dir)
    conn = open_results(runs_dir)

    def score(system: str, model: str, backend: str = "fake"):
        runs = []
        for task, split, items in suite.values():
            fake = FakeBackend(respond=_responder(items, system, evil), name=model)
            fake.identity = {"model": model, "backend": backend}
            runs.append(run_task(fake, task, split, "gen", items, conn, data_dir=data_dir))
        return runs

    candidates = [
        Candidate(find_card(WINNER), score("base", WINNER)),
        Candidate(find_card(OTHER), score("other", OTHER)),
    ]
    _table, record = selection_report(candidates, Budget())
    write_artifact(runs_dir / "selection.json", Selection, record)

    local, served = score("merged", MERGED, "hf"), score("merged", MERGED, "openai")
    gate = parity(list(zip(served, local)), 0.98)
    train_dir = runs_dir / "train" / f"default-{WINNER}"
    (train_dir / "merged").mkdir(parents=True, exist_ok=True)
    parity_record = {
        "items": 8,
        "same_replies": 8,
        "max_abs_logit_diff": 0.0004,
        "tolerance": 0.001,
        "passed": True,
        "three_way": {
            "quantization": "nf4",
            "merge_base": "fp32",
            "trained_vs_fp32_adapter": {
                "items": 8,
                "same_replies": 6,
                "top1_agreement": 0.97,
                "max_abs_logit_diff": 1.9,
            },
            "trained_vs_merged_fp32": {
                "items": 8,
                "same_replies": 6,
                "top1_agreement": 0.97,
                "max_abs_logit_diff": 1.9,
            },
            "tasks": {
                "trained_vs_merged_fp32": [
                    {
                        "entry": "fact-test-gen",
                        "items": 16,
                        "same_outputs": 9,
                        "mean_a": 0.5,
                        "mean_b": 0.44,
                        "metric": "fact_recall",
                        "diff": 0.06,
                        "ci95": [-0.1, 0.2],
                        "p_value": 0.5,
                        "verdict": "no significant difference",
                    }
                ]
            },
        },
    }
    write_artifact(
        train_dir / "merged" / "provenance.json",
        MergeProvenance,
        {
            "base_card": WINNER,
            "base_weights_sha256": "0" * 64,
            "adapter_config": {"r": 16},
            "adapter_sha256": "1" * 64,
            "data_sha256": "2" * 64,
            "recipe": {"name": "default"},
            "recipe_sha256": None,
            "final_train_loss": 0.9,
            "final_val_loss": 1.4,
            "steps": 40,
            "parity": parity_record,
        },
    )
    fact = {
        "base": {"mean": 0.1, "low": 0.0, "high": 0.2, "n": 12},
        "merged": {"mean": 0.7, "low": 0.5, "high": 0.9, "n": 12},
        "ci95": [0.3, 0.8],
        "diff": 0.6,
        "p_value": 0.002,
        "items": 12,
        "task": "fact",
        "split": "test",
        "metric": "fact_recall",
        "verdict": "significantly better",
        "significant": True,
        "better": True,
        "mode": "gen",
        "role": "check",
    }
    summary = {
        "model": WINNER,
        "recipe": "train/default.yaml",
        "steps": 40,
        "train_seconds": 100.0,
        "total_seconds": 130.0,
        "final_train_loss": 0.9,
        "final_val_loss": 1.4,
        "resumed_from": None,
        "merged_model": f"{WINNER}+default-{WINNER}",
        "checks": [fact],
        "parity": parity_record,
        "run_dir": str(train_dir),
        "adapter": str(train_dir / "adapter"),
        "merged": str(train_dir / "merged"),
        "cleaning": {"read": 50, "kept": 48, "duplicates_dropped": 2},
    }
    fact_ids = [i["item_id"] for i in next(r for r in local if r.task.name == "fact").items[:2]]
    summary["contamination"] = {  # two fact items overlap the training data: the clean subset leaves them out
        "conversations": 48,
        "eval_texts": 700,
        "duplicates": 1,
        "overlaps": 1,
        "allowed": True,
        "thresholds": {
            "ngram": 8,
            "duplicate_containment": 0.8,
            "duplicate_cosine": 0.9,
            "overlap_containment": 0.5,
            "overlap_cosine": 0.7,
        },
        "flagged_items": {"fact/test": fact_ids},
        "worst": [
            {
                "train": "mine.jsonl:3",
                "task": "fact",
                "split": "test",
                "item_id": fact_ids[0],
                "field": "question",
                "eval_text": "免费版有多大？" + (EVIL if evil else ""),
                "train_text": "user: 免费版有多大？" + (EVIL if evil else ""),
                "containment": 1.0,
                "cosine": 0.93,
            }
        ],
    }
    from train.checkpoints import choose_checkpoint

    def evaluation(step: int, hits: int) -> CheckpointScores:  # 20 fact items, `hits` of them recalled
        return CheckpointScores(
            schema_version=1,
            step=step,
            adapter="",
            basis={},
            entries={
                "fact-test-gen": {
                    "metric": "fact_recall",
                    "role": "check",
                    "scores": [1.0] * hits + [0.0] * (20 - hits),
                }
            },
        )

    summary["checkpoint"] = {
        **choose_checkpoint({20: evaluation(20, 8), 40: evaluation(40, 11)}, 40),
        "adapter": str(train_dir / "adapter"),
    }
    write_artifact(train_dir / "summary.json", TrainSummary, summary)
    log = [
        {"step": s, "loss": 3.0 / s**0.5, "learning_rate": 2e-4 * (1 - s / 41), "grad_norm": 1.0}
        for s in range(1, 41, 3)
    ]
    log += [{"step": s, "eval_loss": 2.0 - s / 100} for s in (20, 40)]
    log += [
        {
            "step": s,
            "sample": 0,
            "prompt": "免费版有多大？" + (EVIL if evil else ""),
            "reply": ("15GB。" if s == 40 else "我不知道") + (EVIL if evil else ""),
            "flags": [] if s == 40 else ["under-fitting: facts missing: 15GB"],
        }
        for s in (20, 40)
    ]
    (train_dir / "train_log.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in log), encoding="utf-8"
    )
    if evil:
        gate["disagreements"].append(
            {
                "task": "style",
                "item_id": "x",
                "served": EVIL,
                "local": "ok",
                "served_parsed": None,
                "local_parsed": None,
            }
        )
    figures = {
        str(c): {
            "requests": 8,
            "ttft_p50_s": 0.1 * c,
            "latency_p50_s": 1.0 * c,
            "latency_p95_s": 1.5 * c,
            "output_tokens_per_s_per_request": 6.0,
            "throughput_output_tokens_per_s": 5.0 * c,
            "throughput_requests_per_s": 0.2 * c,
        }
        for c in (1, 4)
    }
    rescore = {
        "model": MERGED,
        "engine": "transformers",
        "base_url": "http://127.0.0.1:1",
        "concurrency": 1,
        "model_dir": str(train_dir / "merged"),
        "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": 0},
        "parity": gate,
        "serving": figures,
        "served_runs": {r.task.name: r.run_id for r in served},
        "limit": None,
    }
    write_artifact(runs_dir / "serve" / f"rescore-{MERGED.replace('@', '_')}.json", RescoreRecord, rescore)
    if evil:  # dataset text: prompts and references as a hostile data file would carry them
        with sqlite3.connect(runs_dir / "results.sqlite") as db:
            db.execute(
                "UPDATE items SET prompt = prompt || ?, gold = gold || ?, request_json = replace(request_json, "
                "'\"}]', ?) WHERE CAST(item_id AS TEXT) != ''",
                (EVIL, EVIL, json.dumps(EVIL)[1:-1] + '"}]'),
            )
    conn.close()
    return {"selection": record, "gate": gate}


def add_votes(runs_dir: Path, n_votes: int = 30) -> list[dict]:
    """Pairs among the base, merged and other candidate, and n_votes seeded votes: the merged
    model mostly wins, and the left answer a little more often than chance would give."""
    import random

    from reports import review
    from reports.runs import review_systems

    conn = review.open_review(runs_dir / "results.sqlite")
    review.add_pairs(conn, review_systems(runs_dir, with_candidates=True), seed=0)
    rng = random.Random(7)
    pairs = conn.execute(
        "SELECT pair_id, left_system, system_a, system_b FROM review_pairs ORDER BY position"
    ).fetchall()
    for k, (pid, left, a, b) in enumerate(pairs[:n_votes]):
        merged_side = "left" if MERGED in left else "right" if MERGED in (a + b) else None
        vote = merged_side or rng.choice(["left", "right", "tie", "both_bad"])
        if rng.random() < 0.2:
            vote = "tie"
        review.record_vote(
            conn,
            vote_id=f"fixture-{k:04d}",
            pair=pid,
            vote=vote,
            reviewer=f"r{k % 3}",
            comment=EVIL if k == 0 else "",
            at=1_800_000_000.0 + k,
        )
    out = review.votes(conn)
    conn.close()
    return out
