"""The parity gate of `make rescore`: the served model's runs against the local model's on the
same items (answers that agree, and every metric's paired CI of served - local containing 0)."""

from __future__ import annotations

import json


def same_reply(served: str, local: str) -> bool:
    """Whole replies equal up to surrounding space and a character cut at max_new_tokens: a
    streaming detokenizer (vLLM's) holds back the incomplete bytes of the last character, a
    whole-sequence decode (ours) writes U+FFFD for them."""
    import re

    def norm(text: str) -> str:
        return re.sub(r"[\s\ufffd]+$", "", text.strip())

    return norm(served) == norm(local)


def parity(pairs: list[tuple[object, object]], min_agreement: float) -> dict:
    """pairs: (served RunSummary, local RunSummary) per task, items in the same order."""
    from eval import metrics as M
    from eval.stats import compare
    from eval.summary import metrics_of

    agree = total = 0
    tasks, failures, disagreements = [], [], []
    for served, local in pairs:
        by_id = {i["item_id"]: i for i in local.items}
        same = 0
        choice = served.task.parser == "choice" or served.mode == "ppl"
        # `ppl`: the largest difference of any choice's log-likelihood between the two sides
        loglik_diff = (
            max(
                (
                    abs(a - b)
                    for s in served.items
                    for a, b in zip(
                        json.loads(s["output"]).values(), json.loads(by_id[s["item_id"]]["output"]).values()
                    )
                ),
                default=0.0,
            )
            if served.mode == "ppl"
            else None
        )
        for s in served.items:
            lo = by_id[s["item_id"]]
            # the parsed choice; a free-text task's answer is its whole reply
            if (s["parsed"] == lo["parsed"]) if choice else same_reply(s["output"], lo["output"]):
                same += 1
            else:
                disagreements.append(
                    {
                        "task": served.task.name,
                        "mode": served.mode,
                        "item_id": s["item_id"],
                        "served": s["output"],
                        "local": lo["output"],
                        "served_parsed": s["parsed"],
                        "local_parsed": lo["parsed"],
                    }
                )
        agree, total = agree + same, total + len(served.items)
        metrics = []
        for metric in metrics_of(served):
            a = [i["scores"][metric] for i in served.items]
            b = [by_id[i["item_id"]]["scores"][metric] for i in served.items]
            c = compare(a, b, binary=metric in M.BINARY)
            inside = c.low <= 0 <= c.high
            metrics.append(
                {"served": sum(a) / len(a), "local": sum(b) / len(b), **c.record(metric), "inside_ci": inside}
            )
            if not inside:
                failures.append(
                    f"{served.task.name} {metric}: served - local = {c.diff:+.4f}, "
                    f"95% CI [{c.low:+.4f}, {c.high:+.4f}] excludes 0"
                )
        tasks.append(
            {
                "task": served.task.name,
                "split": served.split,
                "mode": served.mode,
                "items": len(served.items),
                "agreement": same / len(served.items),
                "metrics": metrics,
                "max_abs_loglik_diff": loglik_diff,
                "served_run": served.run_id,
                "local_run": local.run_id,
            }
        )
    agreement = agree / total if total else 1.0
    if agreement < min_agreement:
        failures.insert(0, f"parsed answers agree on {agree}/{total} = {agreement:.1%} < {min_agreement:.0%}")
    return {
        "passed": not failures,
        "agreement": agreement,
        "min_agreement": min_agreement,
        "items": total,
        "failures": failures,
        "tasks": tasks,
        "disagreements": disagreements,
    }
