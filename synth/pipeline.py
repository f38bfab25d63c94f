"""Seeds -> expand -> clean -> answer -> clean -> converse -> write; every teacher call stored.

    make data-synth                                   # synth/fact.yaml, teacher served here
    python -m selectune data-synth --recipe synth/style.yaml --base-url URL --teacher-model NAME

Every random choice (which seeds a round shows, which style an item gets, which items get a
follow-up) is drawn from a generator seeded by the recipe's seed and the item's own text, so
given the same stored teacher answers the output is the same byte for byte. Output, under
runs/synth/<name>/: data.jsonl (a format the trainer reads), report.json (what each filter
removed, with examples), malformed.jsonl (teacher answers that could not be read) and
provenance.json, written last.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from core.artifacts import SynthProvenance, SynthReport, write_artifact
from core.files import sha256_file, write_text_atomic
from core.workspace import SynthOutput
from synth import clean as C
from synth.parse import parse_answer, parse_followup, parse_list
from synth.inputs import context_for, load_context, load_seeds, prompt_env
from synth.recipe import SynthRecipe, resolve
from synth.teacher import BudgetExhausted, Teacher


def _progress(iterable, stage: str, bars: bool = True):
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=f"data-synth {stage}",
        unit="item" if stage != "expand" else "round",
        leave=False,
        disable=not bars,
    )


def _rng(recipe: SynthRecipe, *parts: object) -> random.Random:
    return random.Random(f"{recipe.seed}:" + ":".join(map(str, parts)))


class Run:
    def __init__(
        self,
        recipe: SynthRecipe,
        teacher: Teacher,
        out_dir: Path | None,
        data_dir: Path | None = None,
        called=None,
        bars: bool = True,
    ):
        """`called(stage)`, where given, is told of each teacher call as it returns (the whole command's bar)."""
        self.recipe, self.teacher, self.out_dir, self.data_dir = recipe, teacher, out_dir, data_dir
        self.called = called or (lambda stage: None)
        self.bars = bars
        self.cleaned: list[dict] | None = None
        """The answered items left after the filters, once the answer stage is done."""
        self.env = prompt_env()
        self.counts: dict[str, int] = {}
        self.malformed: list[dict] = []
        self.report = C.Report()
        self.context = load_context(recipe)
        self.stopped: str | None = None

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def ask(
        self, stage: str, template: str, sampling, seed: int, history: list[dict] | None = None, **values
    ) -> str:
        prompt = self.env.get_template(template).render(**values).strip()
        messages = (history or []) + [{"role": "user", "content": prompt}]
        self.count(f"calls_{stage}")
        reply = self.teacher.ask(
            messages,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=seed,
        )
        self.called(stage)
        return reply

    def bad(self, stage: str, why: str, response: str, **where) -> None:
        self.count(f"malformed_{stage}")
        self.malformed.append({"stage": stage, "why": why, "response": response, **where})

    def context_for(self, question: str) -> str | None:
        return context_for(self.recipe, self.context, question)

    # -- the stages ------------------------------------------------------------------------

    # Each stage appends to `out` as it goes, so a budget stop keeps what was finished.

    def expand(self, seeds: list[dict], out: list[dict]) -> None:
        spec = self.recipe.expand
        for r in _progress(range(spec.rounds), "expand", self.bars):
            shots = _rng(self.recipe, "expand", r).sample(seeds, min(spec.shots, len(seeds)))
            reply = self.ask(
                "expand",
                spec.template,
                spec.sampling,
                self.recipe.seed * 1000 + r,
                examples=shots,
                n=spec.per_round,
                what=spec.what,
                context=self.context if spec.with_context else None,
            )
            parsed = parse_list(reply)
            self.count("expand_broken_entries", parsed.broken)
            if not parsed.items:
                self.bad("expand", "no list of examples in the reply", reply, round=r)
                continue
            out += [{**item, "round": r} for item in parsed.items]
            self.count("expanded", len(parsed.items))

    def answer(self, items: list[dict], seeds: list[dict], out: list[dict]) -> None:
        spec = self.recipe.answer
        for item in _progress(items, "answer", self.bars):
            solution = (
                item.get("answer") if not spec.styles else None
            )  # the teacher wrote one with the question
            if solution and not spec.step_by_step:
                out.append(item)
                self.count("answered")
                continue
            rng = _rng(self.recipe, "answer", item["question"])
            style = rng.choice(spec.styles) if spec.styles else None
            pool = [s for s in seeds if style is None or s.get("style") == style]
            shots = rng.sample(pool, min(spec.shots, len(pool)))
            reply = self.ask(
                "answer",
                spec.template,
                spec.sampling,
                self.recipe.seed,
                examples=shots,
                question=item["question"],
                context=self.context_for(item["question"]),
                style=style,
                step_by_step=spec.step_by_step,
                solution=solution,
            )
            text = parse_answer(
                reply,
                step_by_step=spec.step_by_step,
                marker=spec.final_marker,
                keep_reasoning=spec.keep_reasoning,
            )
            if not text:
                self.bad(
                    "answer",
                    "empty answer"
                    if not spec.step_by_step
                    else f"no final line starting with {spec.final_marker!r}",
                    reply,
                    question=item["question"],
                )
                continue
            final = text.rsplit(spec.final_marker, 1)[-1] if spec.step_by_step else text
            if solution and C.norm(C.strip_article(solution)) not in C.norm(final):
                self.bad(
                    "answer",
                    f"the final answer does not contain the solution {solution!r}",
                    reply,
                    question=item["question"],
                )
                continue
            out.append({**item, "answer": text, **({"style": style} if style else {})})
            self.count("answered")

    def converses(self, item: dict) -> bool:
        """Whether `item` gets a follow-up: drawn from its own text, so a replay knows it too."""
        fraction = self.recipe.converse.fraction
        return bool(fraction) and _rng(self.recipe, "converse", item["question"]).random() < fraction

    def converse(self, items: list[dict], out: list[dict]) -> None:
        spec = self.recipe.converse
        for item in _progress(items, "converse", self.bars):
            if not self.converses(item):
                out.append(item)
                continue
            reply = self.ask(
                "followup",
                spec.template,
                spec.sampling,
                self.recipe.seed,
                persona=spec.persona,
                question=item["question"],
                answer=item["answer"],
            )
            follow = parse_followup(reply)
            if not follow or C.norm(follow) == C.norm(item["question"]):
                self.bad("followup", "no follow-up question", reply, question=item["question"])
                out.append(item)
                continue
            first = (
                self.env.get_template(self.recipe.answer.template)
                .render(
                    examples=[],
                    question=item["question"],
                    context=self.context_for(item["question"]),
                    style=item.get("style"),
                    step_by_step=False,
                    solution=None,
                )
                .strip()
            )
            history = [{"role": "user", "content": first}, {"role": "assistant", "content": item["answer"]}]
            second = parse_answer(
                self.teacher.ask(
                    history + [{"role": "user", "content": follow}],
                    temperature=self.recipe.answer.sampling.temperature,
                    top_p=self.recipe.answer.sampling.top_p,
                    max_tokens=self.recipe.answer.sampling.max_tokens,
                    seed=self.recipe.seed,
                )
            )
            self.count("calls_followup_answer")
            self.called("followup_answer")
            if not second:
                self.bad("followup_answer", "empty answer", "", question=follow)
                out.append(item)
                continue
            out.append({**item, "followup": follow, "followup_answer": second})
            self.count("conversations")

    def run(self) -> dict:
        return self.write(*self.synthesize())

    def synthesize(self) -> tuple[list[dict], list[dict]]:
        """Every stage up to the output: the items to write and the seeds; a budget stop ends it early."""
        recipe = self.recipe
        seeds = load_seeds(recipe, self.data_dir)
        self.count("seeds", len(seeds))
        spec = C.CleanSpec(
            **recipe.clean.model_dump(exclude={"check_numbers"}),
            numbers_from=self.context if recipe.clean.check_numbers else None,
        )
        expanded: list[dict] = []
        answered: list[dict] = []
        conversed: list[dict] = []
        cleaned = None
        try:
            self.expand(seeds, expanded)
            questions = C.clean_questions(expanded, seeds, spec, self.report)
            self.count("after_question_filters", len(questions))
            self.answer(questions, seeds, answered)
            cleaned = C.clean_answers(answered, seeds, spec, self.report)
            self.count("after_answer_filters", len(cleaned))
            self.cleaned = cleaned
            self.converse(cleaned, conversed)
        except BudgetExhausted as exc:
            # What was finished is kept: answered items are cleaned, the rest stay single-turn.
            self.stopped = f"budget: {exc}"
            if cleaned is None:
                cleaned = C.clean_answers(answered, seeds, spec, self.report)
                self.count("after_answer_filters", len(cleaned))
        return conversed + (cleaned or [])[len(conversed) :], seeds

    # -- output -----------------------------------------------------------------------------

    def rows(self, items: list[dict]) -> list[dict]:
        fmt = self.recipe.format
        out = []
        for i in items:
            turns = [(i["question"], i["answer"])]
            turns += [(i["followup"], i["followup_answer"])] if "followup" in i else []
            if fmt == "style":
                out.append({"user": i["question"], "assistant": i["answer"], "style": i["style"]})
            elif fmt == "alpaca":
                out.append(
                    {
                        "instruction": turns[-1][0],
                        "input": "",
                        "output": turns[-1][1],
                        "history": [list(t) for t in turns[:-1]],
                    }
                )
            else:
                system = [{"role": "system", "content": self.recipe.system}] if self.recipe.system else []
                chat = [
                    m
                    for q, a in turns
                    for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
                ]
                out.append({"messages": system + chat})
        return out

    def write(self, items: list[dict], seeds: list[dict]) -> dict:
        from eval.runner import git_revision

        rows = self.rows(items)
        self.counts["written"] = len(rows)
        out = SynthOutput(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out.provenance.unlink(missing_ok=True)  # absent until the rest is written
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_text_atomic(out.data, data)
        write_text_atomic(
            out.malformed, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in self.malformed)
        )
        report = {"removed": self.report.removed, "examples": self.report.examples, "counts": self.counts}
        write_artifact(out.report, SynthReport, report)
        r = self.recipe
        templates = {
            t: sha256_file(resolve(t)) for t in {r.expand.template, r.answer.template, r.converse.template}
        }
        budget = self.teacher.budget
        provenance = {
            "recipe": str(r.path),
            "recipe_sha256": sha256_file(r.path) if r.path.is_file() else None,
            "teacher": {
                "model": self.teacher.label,
                "endpoint": self.teacher.backend.base_url,
                "api_key_env": r.teacher.api_key_env,
            },
            "templates_sha256": templates,
            "context_sha256": hashlib.sha256(self.context.encode()).hexdigest() if self.context else None,
            "sampling": {
                "expand": r.expand.sampling.model_dump(),
                "answer": r.answer.sampling.model_dump(),
                "followup": r.converse.sampling.model_dump(),
            },
            "seed": r.seed,
            "seeds_sha256": hashlib.sha256(json.dumps(seeds, ensure_ascii=False).encode()).hexdigest(),
            "counts": self.counts,
            "removed": self.report.removed,
            "budget": {
                "max_calls": budget.max_calls,
                "max_tokens": budget.max_tokens,
                "calls_made": budget.calls,
                "tokens_used": budget.tokens,
                "answers_from_store": budget.cached,
            },
            "stopped": self.stopped,
            "complete": self.stopped is None,
            "format": r.format,
            "data": str(out.data),
            "data_sha256": hashlib.sha256(data.encode()).hexdigest(),
            "git_revision": git_revision(),
        }
        write_artifact(out.provenance, SynthProvenance, provenance)
        return provenance
