"""An LLM judge on the blind review's pairs, asked in both orders, measured against the human votes.

    make review REVIEW_ARGS=--judge-pairs   # with judge_url and judge_model set (docs/reports.md)

Each pair is put to the judge twice, each answer shown first once, at temperature 0; the raw
answer and the verdict read from it are stored per (pair, judge model, answer shown first), so a
rerun asks only what is missing. The judge's verdict on a pair is the system it picks in both
orders; a pair it decides differently by order counts as a tie (as MT-bench does). `make report`
then gives the judge's agreement with the human votes (Cohen's kappa, the confusion table) and a
position-swap audit: how often the verdict survives the swap and how often the answer shown
first wins.
"""

from __future__ import annotations

import re
import sqlite3

PROMPT = """请比较同一请求的两个回答，判断哪一个更好。
Compare two answers to the same request and decide which serves it better: helpful, correct, and in
the style the request asks for. Do not prefer an answer for its length or for its position.

[Request]
{prompt}

[Answer A]
{first}

[Answer B]
{second}

Reply with exactly one of: [[A]] if A is better, [[B]] if B is better, [[C]] for a tie."""
MAX_TOKENS = 16
VERDICT = re.compile(r"\[\[([ABC])\]\]")
LABELS = ("a", "b", "tie")
"""Verdicts in the pair's terms: its system_a wins, its system_b wins, or neither."""


def read_verdict(output: str) -> str | None:
    """'first', 'second' or 'tie' from the first [[A]], [[B]] or [[C]] in the answer; None without one."""
    found = VERDICT.search(output)
    return {"A": "first", "B": "second", "C": "tie"}[found.group(1)] if found else None


def judge_pairs(conn: sqlite3.Connection, judge, *, chunk: int = 16) -> dict:
    """Ask the judge about every recorded pair in both orders it has not answered yet."""
    from eval.backends.base import GenRequest
    from reports.review import pairs_in_order

    model = judge.identity["model"]
    done = set(
        conn.execute("SELECT pair_id, first_system FROM review_judgements WHERE judge_model = ?", (model,))
    )
    todo = []
    for pid, prompt, sa, sb, oa, ob in pairs_in_order(conn):
        for first, shown in ((sa, (oa, ob)), (sb, (ob, oa))):
            if (pid, first) not in done:
                todo.append((pid, first, PROMPT.format(prompt=prompt, first=shown[0], second=shown[1])))
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        outputs = judge.generate(
            [GenRequest([{"role": "user", "content": text}], MAX_TOKENS) for *_, text in part]
        )
        conn.execute("BEGIN IMMEDIATE")  # a chunk at a time: an interrupted run keeps what it has
        conn.executemany(
            "INSERT OR IGNORE INTO review_judgements (pair_id, judge_model, first_system, verdict, output)"
            " VALUES (?, ?, ?, ?, ?)",
            [(pid, model, first, read_verdict(out), out) for (pid, first, _), out in zip(part, outputs)],
        )
        conn.execute("COMMIT")
    return {"asked": len(todo), "model": model}


def judgements(conn: sqlite3.Connection) -> dict[str, dict[str, dict[str, str | None]]]:
    """{judge model: {pair_id: {system shown first: verdict}}}."""
    out: dict[str, dict[str, dict[str, str | None]]] = {}
    for pid, model, first, verdict in conn.execute(
        "SELECT pair_id, judge_model, first_system, verdict FROM review_judgements ORDER BY judge_model"
    ):
        out.setdefault(model, {}).setdefault(pid, {})[first] = verdict
    return out


def pair_verdict(orders: dict[str, str | None], system_a: str, system_b: str) -> str | None:
    """The judge's verdict in the pair's terms (LABELS) from both orders; None unless both were read."""
    picks = []
    for first, second in ((system_a, system_b), (system_b, system_a)):
        verdict = orders.get(first)
        if verdict is None:
            return None
        picks.append({"first": first, "second": second, "tie": "tie"}[verdict])
    if picks[0] == picks[1] and picks[0] != "tie":
        return "a" if picks[0] == system_a else "b"
    return "tie"


def human_verdict(vote: dict) -> str | None:
    if vote["vote"] == "both_bad":
        return None
    if vote["vote"] == "tie":
        return "tie"
    right = vote["system_b"] if vote["left_system"] == vote["system_a"] else vote["system_a"]
    winner = vote["left_system"] if vote["vote"] == "left" else right
    return "a" if winner == vote["system_a"] else "b"


def agreement(
    all_votes: list[dict], verdicts: dict[str, dict[str, str | None]], pairs: dict[str, tuple[str, str]]
) -> dict:
    """The judge against the human votes (each vote one rating; 'both bad' left out) and its
    position-swap audit over every pair it judged. `pairs`: {pair_id: (system_a, system_b)}."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    from reports.review_stats import position_bias

    human, judge = [], []
    for v in all_votes:
        h = human_verdict(v)
        j = pair_verdict(verdicts.get(v["pair_id"], {}), v["system_a"], v["system_b"])
        if h is not None and j is not None:
            human.append(h)
            judge.append(j)
    out: dict = {"n": len(human), "labels": list(LABELS)}
    if human:
        out["agreement"] = sum(h == j for h, j in zip(human, judge)) / len(human)
        out["confusion"] = confusion_matrix(human, judge, labels=list(LABELS)).tolist()  # rows: human
        chance_only = len(set(human) | set(judge)) == 1  # kappa is 0/0 when both always say the same
        out["kappa"] = None if chance_only else float(cohen_kappa_score(human, judge, labels=list(LABELS)))
    consistent = first_wins = decisive = both = unread = 0
    for pid, orders in verdicts.items():
        if pid not in pairs:
            continue
        a, b = pairs[pid]
        read = [orders.get(a), orders.get(b)]
        unread += sum(r is None for r in read) + (2 - len(orders))
        if None in read or len(orders) < 2:
            continue
        both += 1
        pick_ab = {"first": a, "second": b, "tie": "tie"}[read[0]]
        pick_ba = {"first": b, "second": a, "tie": "tie"}[read[1]]
        consistent += pick_ab == pick_ba
        for r in read:
            if r != "tie":
                decisive += 1
                first_wins += r == "first"
    bias = position_bias(first_wins, decisive)
    out["position"] = {
        "pairs": both,
        "consistent": consistent,
        "unread": unread,
        "decisive": decisive,
        "first_wins": first_wins,
        "first_rate": bias["rate"],
        "p_value": bias["p_value"],
    }
    return out
