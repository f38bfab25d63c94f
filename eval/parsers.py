"""Turn a model's reply into a choice letter.

`parse_choice` is anchored on where an answer is stated: the start of the reply, or an explicit
"答案是 B" / "answer: B" / "选B" phrase, or the reply opening with one option's text ("相关").
`first_capital` is OpenCompass's `first_capital_postprocess`, kept only so our numbers line up
with its tables: it reads "The answer is B" as "T".
"""

from __future__ import annotations

import re

_OPEN = r"[\s\(\[（【“\"'「『*_#]*"
# A letter counts as an answer only when nothing word-like follows it: "A good question" is
# English, not option A.
_CLOSE = r"(?=$|[\s.,:;!?)\]）】”\"'」』*_，。：；！？、]|[\u4e00-\u9fff])(?!\s+[a-z])"
_PHRASES = [
    r"(?:正确)?答案\s*(?:是|为|应该是|应为)?\s*[:：]?",
    r"答\s*[:：]",
    r"选(?:择|项)?\s*(?:是|为)?\s*[:：]?",
    r"(?i:the\s+(?:correct\s+)?answer\s+is)\s*[:：]?",
    r"(?i:answer)\s*[:：]",
    r"(?i:option)\s*[:：]?",
]
_OPTION_LINE = re.compile(r"^([A-Z])[.．、]\s*(.+?)\s*$", re.MULTILINE)


def option_texts(prompt: str, choices: list[str]) -> dict[str, str]:
    """{"A": "无关", "B": "相关"} read from the prompt's option lines."""
    found = {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(prompt)}
    return {c: found[c] for c in choices if c in found}


def parse_choice(reply: str, choices: list[str], options: dict[str, str] | None = None) -> str | None:
    """The choice the reply states, or None when it states none (or several at once)."""
    letters = "".join(re.escape(c) for c in choices)
    text = reply.strip()
    listed = set(re.findall(f"^[{letters}](?=[.．、])", text, flags=re.MULTILINE))
    if len(listed) > 1:
        return None  # the reply lists the options back ("A. 无关\nB. 相关"): no answer given
    start = re.match(_OPEN + f"([{letters}])" + _CLOSE, text)
    if start:
        return start.group(1)
    for phrase in _PHRASES:
        m = re.search(phrase + _OPEN + f"([{letters}])" + _CLOSE, text)
        if m:
            return m.group(1)
    if options:
        opening = [c for c, t in options.items() if text.lstrip(_OPEN_CHARS).startswith(t)]
        # "可能" must not be read as "对" etc.: only an unambiguous opening counts.
        if len(opening) == 1:
            return opening[0]
    return None


_OPEN_CHARS = " \t\n([（【“\"'「『*_#"


def first_capital(reply: str) -> str:
    """OpenCompass's first_capital_postprocess: the first upper-case character, else ""."""
    return next((ch for ch in reply if ch.isupper()), "")
