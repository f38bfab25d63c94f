"""Task files: every shipped one validates; bad tasks and bad data stop with one line each."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from eval.task import TASKS_DIR, load_items, load_task, load_tasks
from core.errors import UserError
from tests.conftest import DELETE, RIDDLE_SPLITS, choice_task, edited, is_fixture

# OpenCompass's prompt strings (FewCLUE_bustm_gen_634f41, FewCLUE_ocnli_fc_gen_f97a97), which
# our rendered prompts must reproduce byte for byte.
OC_BUSTM = (
    "语句一：“{sentence1}”\n语句二：“{sentence2}”\n请判断语句一和语句二说的是否是一个意思？\n"
    "A. 无关\nB. 相关\n请从“A”，“B”中进行选择。\n答："
)
OC_OCNLI = (
    "阅读文章：{sentence1}\n根据上文，回答如下问题：{sentence2}\n"
    "A. 对\nB. 错\nC. 可能\n请从“A”，“B”，“C”中进行选择。\n答："
)


def test_every_task_file_validates():
    paths = sorted(TASKS_DIR.glob("*.yaml"))
    assert {load_task(p).name for p in paths} == {
        "fewclue_bustm",
        "fewclue_ocnli_fc",
        "style",
        "fact",
        "riddles",
    }


# FewCLUE's item counts by source and split (the project's fixture has a dev split only).
FEWCLUE_SIZES = {
    "public": {"fewclue_bustm": {"dev": 160, "test": 1772}, "fewclue_ocnli_fc": {"dev": 160, "test": 2520}},
    "fixture": {"fewclue_bustm": {"dev": 32}, "fewclue_ocnli_fc": {"dev": 24}},
}


def test_a_holdout_splits_a_file_without_splits_by_item_id(shared_data):
    task = load_tasks()["riddles"]
    n_train, n_test, opening, answer = RIDDLE_SPLITS["fixture" if is_fixture(shared_data) else "public"]
    train, test = (load_items(task, split, shared_data) for split in ("train", "test"))
    assert (len(train), len(test)) == (n_train, n_test) and not {i.id for i in train} & {i.id for i in test}
    assert test[0].fields["question"].startswith(opening) and test[0].references == (answer,)
    reseeded = task.model_copy(
        update={
            "data": task.data.model_copy(update={"holdout": task.data.holdout.model_copy(update={"seed": 1})})
        }
    )
    assert {i.id for i in load_items(reseeded, "test", shared_data)} != {i.id for i in test}


@pytest.mark.parametrize(
    ("holdout", "message"),
    [
        ("{split: dev, fraction: 0.2}", "holdout split 'dev' is not one of the splits (train, test)"),
        ("{split: test, fraction: 1.5}", "key 'data.holdout.fraction': Input should be less than 1"),
    ],
)
def test_a_bad_holdout_is_one_line(tmp_path, holdout, message):
    text = (TASKS_DIR / "riddles.yaml").read_text(encoding="utf-8")
    path = tmp_path / "riddles.yaml"
    path.write_text(
        text.replace("holdout: {split: test, fraction: 0.25, seed: 0}", f"holdout: {holdout}"),
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=re.escape(message)) as err:
        load_task(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("task", "template", "labels"),
    [
        ("fewclue_bustm", OC_BUSTM, {"0": "A", "1": "B"}),
        ("fewclue_ocnli_fc", OC_OCNLI, {"entailment": "A", "contradiction": "B", "neutral": "C"}),
    ],
)
def test_fewclue_prompts_are_byte_identical_to_opencompass(shared_data, task, template, labels):
    spec = load_tasks()[task]
    sizes = FEWCLUE_SIZES["fixture" if is_fixture(shared_data) else "public"][task]
    for split, expected_n in sizes.items():
        items = load_items(spec, split, shared_data)
        assert len(items) == expected_n
        for item in items:
            assert item.user.encode() == template.format(**item.fields).encode()
            assert item.gold == labels[item.fields["label"]]
            # OpenCompass's chat wrappers end the HUMAN turn with "\n"; its base wrapper does not.
            assert item.messages() == [{"role": "user", "content": item.user + "\n"}]
            assert item.raw() == item.user


GOOD = choice_task("t", {"splits": {"dev": "t.jsonl"}}, "{{ q }}")


BAD_TASKS = [
    (edited(GOOD, colour="red"), "unknown key 'colour'"),
    (edited(GOOD, prompt__assistant="x"), "unknown key 'prompt.assistant'"),
    (edited(GOOD, metrics=["meteor"]), "unknown metric 'meteor'"),
    # a metric the task cannot compute is a load-time error naming the task, the metric and why
    (
        edited(GOOD, metrics=["bleu"]),
        "task 't' cannot compute metric 'bleu': it compares the reply with a reference: set reference_field",
    ),
    (
        edited(GOOD, metrics=["regex_match"]),
        "task 't' cannot compute metric 'regex_match': it needs the pattern",
    ),
    (
        edited(GOOD, metrics=["fact_recall"]),
        "cannot compute metric 'fact_recall': it is computed by a task's own scorer",
    ),
    (
        edited(GOOD, parser="text", modes=["gen"], label=DELETE, choices=DELETE),
        "task 't' cannot compute metric 'accuracy': it needs `parser: choice`",
    ),
    (edited(GOOD, regex="(unclosed", metrics=["regex_match"]), "regex is not a valid pattern"),
    (edited(GOOD, normalize=["stemming"]), "key 'normalize.0'"),
    (edited(GOOD, default_split="test"), "default_split 'test' is not in data.splits"),
    (edited(GOOD, label__map={"0": "A", "1": "Z"}), "label.map values must all be choices"),
    (edited(GOOD, modes=["beam"]), "key 'modes.0'"),
    (edited(GOOD, description=DELETE), "missing key 'description'"),
]


@pytest.mark.parametrize(("task", "expected"), BAD_TASKS, ids=[e for _, e in BAD_TASKS])
def test_bad_task_is_one_line(tmp_path, task, expected):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_task(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and expected in str(info.value)


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nprompt: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_task(path)
    assert "\n" not in str(info.value) and "cannot read task" in str(info.value)


def _task_with_data(tmp_path, rows: bytes | list[dict]):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(GOOD), encoding="utf-8")
    data = tmp_path / "t.jsonl"
    if isinstance(rows, bytes):
        data.write_bytes(rows)
    else:
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return load_task(path), data


BAD_DATA = [
    (
        [{"q": "a", "label": "0"}, {"q": "b", "label": "7"}],
        r"t.jsonl:2: label '7' is not one of \['0', '1'\]",
    ),
    ([{"q": "a", "label": "0"}, {"label": "1"}], r"t.jsonl:2: prompt needs a field the row lacks"),
    ([{"q": "a"}], r"t.jsonl:1: missing label field 'label'"),
    ([], r"t.jsonl: split 'dev' of task t has no items"),
    (b'{"q": "a", "label": "0"}\n{"q": "b", "label": \n', r"t.jsonl:2: invalid JSON"),
    ('{"q": "语句", "label": "0"}\n'.encode("gbk"), r"t.jsonl: not UTF-8 text"),
]


@pytest.mark.parametrize(("rows", "expected"), BAD_DATA, ids=[e for _, e in BAD_DATA])
def test_bad_data_is_one_line(tmp_path, rows, expected):
    task, _ = _task_with_data(tmp_path, rows)
    with pytest.raises(UserError, match=expected) as info:
        load_items(task, "dev", tmp_path)
    assert "\n" not in str(info.value)


def test_missing_data_file(tmp_path):
    task, data = _task_with_data(tmp_path, [{"q": "a", "label": "0"}])
    data.unlink()
    with pytest.raises(UserError, match=r"t.jsonl: data file not found"):
        load_items(task, "dev", tmp_path)


def test_row_without_its_id_field(tmp_path):
    task, _ = _task_with_data(tmp_path, [{"q": "a", "label": "0"}])
    task = task.model_copy(update={"data": task.data.model_copy(update={"id_field": "id"})})
    with pytest.raises(UserError, match=r"t.jsonl:1: missing id field 'id'"):
        load_items(task, "dev", tmp_path)


def test_bad_jinja_in_the_prompt(tmp_path):
    task, _ = _task_with_data(tmp_path, [{"q": "a", "label": "0"}])
    task = task.model_copy(update={"prompt": task.prompt.model_copy(update={"user": "{{ q "})})
    with pytest.raises(UserError, match=r"key 'prompt': bad Jinja template"):
        load_items(task, "dev", tmp_path)
