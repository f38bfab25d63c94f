"""A user's own choice task for the tests of `select` on user files (endpoints, Ray): pairs of
sentences, "same meaning?" answered A (no) or B (yes)."""

from __future__ import annotations

import json


def pairs_task(splits: dict[str, str], max_new_tokens: int) -> str:
    """The task file, its splits read from the JSON-lines files `splits` names."""
    files = ", ".join(f"{split}: {name}" for split, name in splits.items())
    return f"""name: pairs
version: 1
description: Same meaning? A = no, B = yes.
data: {{root: file, format: jsonl, splits: {{{files}}}, id_field: id}}
default_split: dev
prompt: {{user: "{{{{ a }}}} / {{{{ b }}}}\\nA. no\\nB. yes\\nAnswer:"}}
modes: [gen, ppl]
choices: [A, B]
label: {{field: label}}
gen: {{max_new_tokens: {max_new_tokens}}}
parser: choice
metrics: [accuracy]
"""


def pairs_rows(ids, phrases: int, label) -> str:
    """JSON lines of the items `ids`: sentence k against phrase k % phrases, labelled label(k)."""
    return "".join(
        json.dumps({"id": k, "a": f"sentence {k}", "b": f"phrase {k % phrases}", "label": label(k)}) + "\n"
        for k in ids
    )
