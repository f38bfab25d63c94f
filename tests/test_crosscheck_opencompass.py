"""Cross-check: OpenCompass's own FewCLUE gen configs, run by its CLI in its own venv, give the
same first-capital predictions and accuracy as our `accuracy_opencompass` column."""

from __future__ import annotations

import pytest

from bench.fixtures import build_tiny_qwen2
from eval.opencompass_crosscheck import OC_VENV, compare, run_opencompass, write_workdir
from eval.parsers import first_capital
from tests.conftest import scored_on_tiny_weights

pytestmark = pytest.mark.skipif(
    not (OC_VENV / "bin" / "opencompass").is_file(),
    reason="no OpenCompass venv (make opencompass-venv; make test builds it)",
)


@pytest.mark.parametrize("task_name", ["fewclue_bustm", "fewclue_ocnli_fc"])
def test_opencompass_rule_column_matches_opencompass(tmp_path, task_data, task_name):
    # Wide initialisation: replies that differ from prompt to prompt (and odd Unicode capitals);
    # Qwen2.5's rope_theta, which transformers 4 would lose without the config rewrite.
    tiny_qwen2_dir = build_tiny_qwen2(tmp_path / "tiny-qwen2", initializer_range=1.0, rope_theta=1e6)
    task, items, ours = scored_on_tiny_weights(tmp_path, tiny_qwen2_dir, task_name, 12, "gen", task_data)
    order = {item.id: n for n, item in enumerate(items)}
    ours_in_file_order = sorted(ours.items, key=lambda r: order[r["item_id"]])
    workdir = tmp_path / "oc"
    abbr = write_workdir(
        workdir,
        task_data,
        tiny_qwen2_dir,
        task_name,
        "dev",
        limit=12,
        batch_size=4,
        max_out_len=task.gen.max_new_tokens,
    )
    theirs = run_opencompass(workdir, abbr)
    report = compare(ours_in_file_order, theirs)
    assert report["items"] == 12 and report["gold_mismatches"] == 0, report
    assert report["differing_first_capital"] == 0, report
    assert 0 < theirs.infer_seconds < theirs.seconds
    assert len({first_capital(p) for p in theirs.predictions}) >= 3, theirs.predictions  # not degenerate
    assert theirs.accuracy == pytest.approx(report["selectune_accuracy_opencompass"]), report
