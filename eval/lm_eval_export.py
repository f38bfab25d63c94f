"""Export a multiple-choice task to lm-eval's YAML format, and run lm-eval's `hf` backend on it.

    make bench-eval          # bench/eval_speed.py: the export, lm-eval's run and the comparison

The export keeps our Jinja prompt as lm-eval's `doc_to_text` (both use Jinja) and writes the
split's rows, with the gold choice index added, to a JSON Lines file beside the YAML, so lm-eval
reads exactly our items. The option letters follow the prompt with no delimiter, as in our
`ppl` mode, and chat models get their chat template in both tools. One known difference: lm-eval
moves a context's trailing whitespace (the chat template's final "\n") into the continuation, so
each of its log-likelihoods carries the same extra log p("\n" | context); the differences between
options, and so the predictions and accuracy, are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from eval.task import Item, TaskSpec

GOLD_FIELD = "selectune_gold"


@dataclass(frozen=True)
class LmEvalResult:
    accuracy: float
    predictions: dict[str, str]
    """Item id -> the choice lm-eval scored highest."""
    loglikelihoods: dict[str, dict[str, float]]


def export_task(task: TaskSpec, split: str, items: list[Item], out_dir: Path, *, chat: bool) -> str:
    """Write `<out_dir>/<name>.yaml` and its data; returns the lm-eval task name. `chat`: lm-eval
    will apply the chat template, so the prompt gets the task's chat_turn_end."""
    name = f"selectune_{task.name}_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for item in items:
            row = {**item.fields, "selectune_id": item.id, GOLD_FIELD: task.choices.index(item.gold)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": task.prompt.user + (task.prompt.chat_turn_end if chat else ""),
        "doc_to_target": f"{{{{{GOLD_FIELD}}}}}",
        "doc_to_choice": list(task.choices),
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    if task.prompt.system:
        config["description"] = task.prompt.system
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return name


def run_lm_eval(
    checkpoint: str, task_name: str, task_dir: Path, *, chat_template: bool, batch_size: int = 8
) -> LmEvalResult:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": checkpoint, "dtype": "float32", "device": "cpu"},
        tasks=[task_name],
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=chat_template,
        log_samples=True,
        batch_size=batch_size,
    )
    predictions, lls = {}, {}
    for sample in out["samples"][task_name]:
        doc = sample["doc"]
        scores = [r[0] for r in sample["filtered_resps"]]
        choices = list(sample["arguments"][i][1] for i in range(len(scores)))
        lls[str(doc["selectune_id"])] = dict(zip(choices, map(float, scores)))
        predictions[str(doc["selectune_id"])] = choices[max(range(len(scores)), key=scores.__getitem__)]
    return LmEvalResult(out["results"][task_name]["acc,none"], predictions, lls)
