"""Cross-check: our `ppl` mode and lm-eval's `hf` backend score the same items the same way."""

from __future__ import annotations

import pytest

from eval.lm_eval_export import export_task, run_lm_eval
from tests.conftest import scored_on_tiny_weights

pytest.importorskip("lm_eval")


@pytest.mark.parametrize("task_name", ["fewclue_bustm", "fewclue_ocnli_fc"])
def test_ppl_accuracy_and_predictions_match_lm_eval(tmp_path, tiny_qwen2_dir, task_data, task_name):
    task, items, ours = scored_on_tiny_weights(tmp_path, tiny_qwen2_dir, task_name, 24, "ppl", task_data)
    name = export_task(task, "dev", items, tmp_path / "lm_eval_tasks", chat=True)
    theirs = run_lm_eval(
        str(tiny_qwen2_dir), name, tmp_path / "lm_eval_tasks", chat_template=True, batch_size=4
    )
    import json

    for row in ours.items:
        mine, lm = json.loads(row["output"]), theirs.loglikelihoods[row["item_id"]]
        # lm-eval moves the context's trailing "\n" into the continuation, adding the same
        # log p("\n" | context) to every option: the differences between options must agree.
        first = task.choices[0]
        for choice in task.choices[1:]:
            assert lm[choice] - lm[first] == pytest.approx(mine[choice] - mine[first], abs=1e-3)
        assert theirs.predictions[row["item_id"]] == row["parsed"]
    accuracy = sum(r["scores"]["accuracy"] for r in ours.items) / len(ours.items)
    assert theirs.accuracy == pytest.approx(accuracy)
