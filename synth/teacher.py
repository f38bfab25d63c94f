"""The teacher: an OpenAI-compatible endpoint whose every answer is stored before it is used.

Calls are keyed by a hash of the model name, the messages and the sampling parameters (not the
endpoint's address, so a server restarted on another port is the same teacher). A rerun finds
its earlier answers in the store and pays for nothing twice; the budget counts only calls that
reach the endpoint.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass

from core.store import migrate


class BudgetExhausted(Exception):
    """The next call would go over the run's call or token budget."""


@dataclass
class Budget:
    max_calls: int | None = None
    max_tokens: int | None = None
    """Prompt plus completion tokens as the server reports them (characters where it reports none)."""
    calls: int = 0
    tokens: int = 0
    cached: int = 0

    def check(self) -> None:
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise BudgetExhausted(f"the call budget is spent ({self.calls} of {self.max_calls} calls)")
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            raise BudgetExhausted(f"the token budget is spent ({self.tokens} of {self.max_tokens} tokens)")


class Teacher:
    def __init__(self, backend, conn: sqlite3.Connection, budget: Budget, label: str | None = None):
        """backend: an eval.backends.openai_http.OpenAIBackend (or anything with its `chat`);
        label: the teacher's name in the store's keys (default the model name sent)."""
        self.backend = backend
        self.label = label or backend.model
        self.conn = conn
        self.budget = budget
        migrate(conn)

    def ask(
        self, messages: list[dict], *, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> str:
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        request = {"model": self.label, "messages": messages, "sampling": sampling}
        blob = json.dumps(request, ensure_ascii=False, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()
        row = self.conn.execute("SELECT response FROM teacher_calls WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self.budget.cached += 1
            return row[0]
        self.budget.check()
        text, usage = self.backend.chat(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        used = usage.get("total_tokens") or (sum(len(m["content"]) for m in messages) + len(text))
        with self.conn:
            self.conn.execute(
                "INSERT OR IGNORE INTO teacher_calls (key, model, request_json, response, usage_json,"
                " time) VALUES (?, ?, ?, ?, ?, ?)",
                (key, self.label, blob, text, json.dumps(usage), time.time()),
            )
        self.budget.calls += 1
        self.budget.tokens += int(used)
        return text
