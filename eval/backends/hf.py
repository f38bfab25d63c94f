"""Local transformers backend: greedy generation and continuation log-likelihoods, batched.

Every call treats the requests it is given as a fixed set and pads them together (left padding,
position ids from the mask), so the same requests always produce the same numbers: the runner
relies on that to resume a killed run with results identical to an uninterrupted one.

Log-likelihood is computed without waste: contexts whose continuations are all one token (the
option letters of FewCLUE's ppl mode) run once and are scored from the last position, the LM
head is applied only to the positions that are scored (`logits_to_keep`), and the context prefix
a batch's rows share runs once, as in generation below.

Generation computes the prompt prefix shared by a call's requests (the chat template's system
turn and the task's opening words) once, at batch 1, and starts every row from a copy of its
key/value cache: rows are laid out as [shared prefix][padding][own tokens], position ids follow
the mask, so each row reads exactly what it would read alone. The prefix depends only on the
call's requests, which keeps a call's numbers a function of its requests.

On the CPU in float32 the model's linear layers run through oneDNN with their weights packed once
at load (models/prepack.py): a decode step of 16 rows took about half the time it takes through
MKL's sgemm, which repacks each weight on every call. The identity records the kernel, so runs
made with and without it are kept apart.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE, GenRequest, LoglikelihoodRequest, cut_at_stop
from models.card import ModelCard
from models.loading import load_tokenizer, load_weights, resolve_device, resolve_dtype
from models.store import read_manifest
from core.files import sha256_file, sha256_text


@dataclass(frozen=True)
class Batch:
    """One batch as the backend runs it."""

    rows: int
    tokens: int
    """Tokens the batch's forward pass processes past the shared prefix: each row padded to the widest."""
    kept: int
    """Positions per row whose logits are computed (the continuation, or the next token)."""
    max_new_tokens: int
    """Generation only: the decoding steps at most (0 when scoring continuations)."""
    prefix: tuple[int, ...] = ()
    """The shared prefix, run once at batch 1 unless the batch before shared the same one."""


@dataclass
class _Row:
    ids: list[int]
    tail: int
    """How many trailing ids are the continuation (0: score the next token after `ids`)."""
    targets: list[tuple[int, list[int]]]
    """(request index, continuation ids) scored from this row."""


def shared_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the rows' common prefix, leaving every row at least one token of its own."""
    shared, shortest = 0, min(map(len, seqs))
    while shared < shortest - 1 and all(s[shared] == seqs[0][shared] for s in seqs):
        shared += 1
    return shared


class HFBackend:
    def __init__(
        self,
        card: ModelCard,
        store: Path,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: str = "auto",
        device: str = "auto",
        checkpoint: Path | None = None,
        prepack: bool = True,
        lazy: bool = False,
    ):
        """`checkpoint`: load this directory instead of the card's stored one (a merged fine-tune;
        pass a card whose name and chat_template describe it). `device` and `dtype` "auto": a CUDA
        GPU in bfloat16 when there is one, else the CPU in float32. `prepack`: run fp32 CPU
        linears through oneDNN with packed weights where torch has it (False: torch's default,
        as the reference tools run). `lazy`: load the weights on first use rather than here (the
        identity and prompts need only the tokenizer, so a run whose items are all stored never
        loads them)."""
        import transformers

        self.card = card
        self.batch_size = batch_size
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(card, store, checkpoint=checkpoint)
        kernel = "aten"
        if prepack and self.device == "cpu" and dtype == "float32":
            from models import prepack as packing

            if packing.available():
                kernel = packing.KERNEL
        self._load = lambda: load_weights(card, store, dtype=dtype, device=self.device, checkpoint=checkpoint)
        self._model = None
        if checkpoint is None:
            manifest = read_manifest(card, store) or {}
        else:
            files = sorted(checkpoint.glob("*.safetensors"))
            manifest = {"weights_sha256": sha256_text(" ".join(sha256_file(f) for f in files))}
        self.identity = {
            "backend": "hf",
            "model": card.name,
            "weights_sha256": manifest.get("weights_sha256"),
            # Hashed from the tokenizer as loaded: a hub or local checkpoint has no manifest hash.
            "chat_template_sha256": sha256_text(self.tokenizer.chat_template)
            if self.tokenizer.chat_template
            else None,
            "chat_template": card.chat_template,
            "dtype": dtype,
            "device": self.device,
            "linear_kernel": kernel,
            "transformers": transformers.__version__,
        }
        self._prefix_cache = None  # (prefix ids, batch-1 cache) of the last generate call
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        if not lazy:
            self.model  # noqa: B018 (loads the weights)

    @classmethod
    def from_model(
        cls,
        card: ModelCard,
        model,
        tokenizer,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str | None = None,
    ) -> HFBackend:
        """A backend around weights already in memory (a checkpoint evaluated while training):
        nothing is loaded, and its identity names no stored weights, so it is not for the
        results store. `card` says how prompts are rendered (its chat_template and add_bos)."""
        import transformers

        self = cls.__new__(cls)
        self.card, self.batch_size, self.tokenizer, self._model = card, batch_size, tokenizer, model
        self.device = str(model.device)
        self.identity = {
            "backend": "hf",
            "model": name or card.name,
            "weights_sha256": None,
            "in_memory": True,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": self.device,
            "transformers": transformers.__version__,
        }
        self._prefix_cache = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return self

    @property
    def model(self):
        """The weights, loaded on first use; with the linears packed when the identity says so."""
        if self._model is None:
            model = self._load()
            if self.identity["linear_kernel"] != "aten":
                from models import prepack as packing

                packing.prepack_linears(model, self.batch_size)
            self._model = model
        return self._model

    def render(self, messages: list[dict], raw: str | None = None) -> str:
        """The exact text the model reads: chat template (with generation prompt) or raw."""
        if self.card.chat_template == "tokenizer":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return raw if raw is not None else "\n\n".join(m["content"] for m in messages)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        # A chat template writes its own BOS; a raw prompt gets one when the card requires it.
        if self.card.add_bos and self.card.chat_template == "none":
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def _batch(self, seqs: list[list[int]]):
        import torch

        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[float]:
        import torch

        rows = self._rows(requests)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
        out = [0.0] * len(requests)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = [rows[i] for i in order[start : start + self.batch_size]]
                keep = max(r.tail for r in batch) + 1
                # The shared prefix may not reach a scored position: share among the contexts.
                shared = shared_prefix_length([r.ids[: len(r.ids) - r.tail] for r in batch])
                input_ids, mask, cache = self._prefixed_batch([r.ids for r in batch], shared)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                start_at = 0 if cache is None else shared
                logits = self.model(
                    input_ids=input_ids[:, start_at:],
                    attention_mask=mask,
                    position_ids=positions[:, start_at:],
                    past_key_values=cache,
                    logits_to_keep=keep,
                ).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for b, row in enumerate(batch):
                    for req, cont in row.targets:
                        if row.tail == 0:
                            out[req] = logprobs[b, keep - 1, cont[0]].item()
                        else:  # token j of the tail is predicted at kept index keep - tail + j - 1
                            idx = torch.arange(keep - row.tail - 1, keep - 1, device=logprobs.device)
                            out[req] = (
                                logprobs[b, idx, torch.tensor(cont, device=logprobs.device)].sum().item()
                            )
        return out

    def split_ids(self, request: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them: encode the whole, cut at the
        context (the continuation alone where the context's ids are not a prefix of the whole)."""
        context = self.render(request.messages, request.raw)
        ctx_ids = self._encode(context)
        whole = self._encode(context + request.continuation)
        cont = (
            whole[len(ctx_ids) :]
            if whole[: len(ctx_ids)] == ctx_ids
            else self.tokenizer(request.continuation, add_special_tokens=False).input_ids
        )
        return ctx_ids, cont

    def _rows(self, requests: list[LoglikelihoodRequest]) -> list[_Row]:
        """Split each context+continuation as lm-eval does (encode the whole, cut at the context)."""
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, r in enumerate(requests):
            ctx_ids, cont = self.split_ids(r)
            by_context[tuple(ctx_ids)].append((i, cont))
        rows = []
        for ctx, targets in by_context.items():
            if all(len(c) == 1 for _, c in targets):
                rows.append(_Row(list(ctx), 0, targets))
            else:
                rows.extend(_Row([*ctx, *c], len(c), [(i, c)]) for i, c in targets)
        return rows

    def generate(self, requests: list[GenRequest]) -> list[str]:
        """Greedy replies in length-sorted batches; a prompt asked more than once (with the same
        max_new_tokens) is generated once, since greedy decoding gives it one reply."""
        import torch
        from transformers import GenerationConfig

        keys = [(tuple(self._encode(self.render(r.messages, r.raw))), r.max_new_tokens) for r in requests]
        unique = list(dict.fromkeys(keys))
        order = sorted(range(len(unique)), key=lambda u: -len(unique[u][0]))
        replies: dict[tuple, str] = {}
        base = self.model.generation_config
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = [unique[u] for u in order[start : start + self.batch_size]]
                input_ids, mask, cache = self._prefixed_batch([list(ids) for ids, _ in chunk])
                config = GenerationConfig(
                    do_sample=False,
                    max_new_tokens=max(n for _, n in chunk),
                    eos_token_id=base.eos_token_id,
                    pad_token_id=self.pad_id,
                    bos_token_id=base.bos_token_id,
                )
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, past_key_values=cache, generation_config=config
                )
                for row, key in enumerate(chunk):
                    new = generated[row, input_ids.shape[1] :][: key[1]].tolist()
                    replies[key] = self.tokenizer.decode(new, skip_special_tokens=True)
        return [cut_at_stop(replies[key], r.stop) for key, r in zip(keys, requests)]

    def planned_batches(self, requests: list[GenRequest] | list[LoglikelihoodRequest]) -> list[Batch]:
        """The batches `generate` or `loglikelihood` would run for `requests`, from the tokenizer
        alone (no weights): the cost estimates (eval/estimate.py) count the work from these."""
        if requests and isinstance(requests[0], GenRequest):
            keys = list(
                dict.fromkeys(
                    (tuple(self._encode(self.render(r.messages, r.raw))), r.max_new_tokens) for r in requests
                )
            )
            seqs, steps = [list(ids) for ids, _ in keys], [n for _, n in keys]
            kept, contexts = [1] * len(seqs), seqs
        else:  # as loglikelihood does: the prefix is shared among the contexts only
            rows = self._rows(requests)
            seqs, steps, kept = [r.ids for r in rows], [0] * len(rows), [r.tail + 1 for r in rows]
            contexts = [r.ids[: len(r.ids) - r.tail] for r in rows]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = []
        for start in range(0, len(order), self.batch_size):
            part = order[start : start + self.batch_size]
            width = len(seqs[part[0]])
            shared = shared_prefix_length([contexts[i] for i in part])
            shared = shared if shared >= 2 else 0
            out.append(
                Batch(
                    len(part),
                    len(part) * (width - shared),
                    max(kept[i] for i in part),
                    max(steps[i] for i in part),
                    tuple(seqs[part[0]][:shared]),
                )
            )
        return out

    def _prefixed_batch(self, seqs: list[list[int]], shared: int | None = None):
        """(input_ids, attention_mask, cache): the rows' first `shared` tokens (default: their
        longest common prefix, leaving every row at least one token of its own for generation
        to start from) are run once and their cache repeated per row; the cache is None when
        there is no prefix worth sharing. input_ids and the mask cover the whole rows."""
        import copy

        import torch

        if shared is None:
            shared = shared_prefix_length(seqs)
        if shared < 2:
            input_ids, mask, _ = self._batch(seqs)
            return input_ids, mask, None
        prefix = tuple(seqs[0][:shared])
        if self._prefix_cache is None or self._prefix_cache[0] != prefix:
            cache = self.model(
                input_ids=torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1
            ).past_key_values
            self._prefix_cache = (prefix, cache)
        cache = copy.deepcopy(self._prefix_cache[1])
        cache.batch_repeat_interleave(len(seqs))
        rest, mask_rest, _ = self._batch([s[shared:] for s in seqs])
        head = torch.tensor([prefix], device=self.device).expand(len(seqs), -1)
        return (torch.cat([head, rest], dim=1), torch.cat([torch.ones_like(head), mask_rest], dim=1), cache)
