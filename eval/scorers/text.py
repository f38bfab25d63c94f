"""Checks on generated text that any stage can use: whether a reply has collapsed."""

from __future__ import annotations


def degenerate(reply: str) -> str | None:
    """Why a reply looks collapsed, or None: empty, one character making up most of it, or a
    phrase looping (few distinct character pairs in a long reply)."""
    text = reply.strip()
    if not text:
        return "empty reply"
    if len(text) >= 8:
        top = max(text.count(c) for c in set(text))
        if top / len(text) > 0.5:
            return f"one character is {top / len(text):.0%} of the reply"
    if len(text) >= 40:
        pairs = [text[k:k + 2] for k in range(len(text) - 1)]
        if len(set(pairs)) / len(pairs) < 0.35:
            return f"a phrase repeats: {len(set(pairs))} distinct character pairs in {len(text)} characters"
    return None

