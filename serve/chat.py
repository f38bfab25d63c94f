"""An interactive terminal chat with a served model, as `lmdeploy chat` offers: the server applies
the model's chat template and the sampling is the one re-scoring pins (greedy, seed 0).

    make chat            # the server `make serve` started
Type a message and Enter; `reset` starts a new conversation, `exit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import sys

from core.errors import UserError
from serve.stream import stream_chat


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
            reply = []
            try:
                for kind, piece in stream_chat(client, model, history, max_tokens=max_tokens):
                    if kind == "delta":
                        reply.append(piece)
                        stdout.write(piece)
                        stdout.flush()
            except httpx.TransportError as exc:
                raise UserError(
                    f"{base_url}: the server went away ({type(exc).__name__}); `make serve` starts it again"
                ) from None
            history.append({"role": "assistant", "content": "".join(reply)})
            stdout.write("\n")


def chat_command(
    settings, *, base_url: str | None = None, served_model: str | None = None, max_tokens: int = 512
) -> int:
    """`selectune chat` (`make chat`): with the server `make serve` started, or at --base-url."""
    from serve.launcher import running

    if base_url:
        return chat(base_url, served_model or "default", max_tokens=max_tokens)
    current = running(settings.workspace.server_state)
    if current is None:
        raise UserError("chat: no server running; `make serve` first (or pass --base-url)")
    print(
        f"chat with {current[1].model} at {current[0].base_url}; `reset` for a new conversation, "
        "`exit` to leave"
    )
    return chat(current[0].base_url, current[0].model_name, max_tokens=max_tokens)
