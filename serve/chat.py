"""An interactive terminal chat with a served model, as `lmdeploy chat` offers: the server applies
the model's chat template and the sampling is the one re-scoring pins (greedy, seed 0).

    make chat            # the server `make serve` started
Type a message and Enter; `reset` starts a new conversation, `exit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import json
import sys

from serve.rescore import SAMPLING
from core.errors import UserError


def chat(base_url: str, model: str, *, max_tokens: int = 512, stdin=None, stdout=None) -> int:
    import httpx

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    with httpx.Client(base_url=base_url, timeout=600.0) as client:
        while True:
            stdout.write("\n>>> ")
            stdout.flush()
            line = stdin.readline()
            if not line or line.strip() == "exit":
                return 0
            if line.strip() == "reset":
                history = []
                stdout.write("(new conversation)\n")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            body = {"model": model, "messages": history, "max_tokens": max_tokens, "stream": True, "n": 1,
                    **SAMPLING}
            reply = []
            try:
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise UserError(f"{base_url}: HTTP {response.status_code}: {response.text[:200]}")
                    for event in response.iter_lines():
                        if not event.startswith("data:") or event.strip() == "data: [DONE]":
                            continue
                        for choice in json.loads(event[5:]).get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content") or ""
                            reply.append(piece)
                            stdout.write(piece)
                            stdout.flush()
            except httpx.TransportError as exc:
                raise UserError(f"{base_url}: the server went away ({type(exc).__name__}); "
                                "`make serve` starts it again") from None
            history.append({"role": "assistant", "content": "".join(reply)})
            stdout.write("\n")
