"""`select --plan` (eval/plan.py): the sample-size formulas against hand calculations, the
verdicts, and a pilot through the command line on tiny models."""

from __future__ import annotations

import math

import pytest

from eval.plan import detectable_at, items_needed, pilot_items, plan

Z975, Z80 = 1.959963984540054, 0.8416212335729143


@pytest.mark.parametrize(
    ("a", "b", "delta", "binary", "expected"),
    [
        # McNemar (Connor 1987): p_d = 0.25, d = 0.1: (1.96 * 0.5 + 0.8416 * sqrt(0.24))^2 / 0.01 = 193.85
        ([1] * 25 + [0] * 75, [0] * 100, 0.10, True, 194),
        # p_d = 0.5, d = 0.2: (1.96 * sqrt(0.5) + 0.8416 * sqrt(0.46))^2 / 0.04 = 95.7
        ([1] * 30 + [0] * 20 + [0] * 50, [0] * 30 + [1] * 20 + [0] * 50, 0.20, True, 96),
        # paired z: sd = sqrt(100/99), d = 0.2: (2.8016 * 1.00504 / 0.2)^2 = 198.2
        ([1, -1] * 50, [0] * 100, 0.20, False, 199),
        ([1] * 10, [1] * 10, 0.10, True, None),  # no discordant pair: nothing to plan from
        ([1] * 10, [0] * 10, 0.0, True, None),  # no difference to detect
    ],
)
def test_items_needed_matches_the_hand_calculation(a, b, delta, binary, expected):
    assert items_needed(a, b, delta, binary=binary) == expected


def test_the_hand_calculation_itself():
    assert math.ceil((Z975 * 0.5 + Z80 * math.sqrt(0.24)) ** 2 / 0.01) == 194
    assert math.ceil((Z975 * math.sqrt(0.5) + Z80 * math.sqrt(0.46)) ** 2 / 0.04) == 96


def test_36_items_detect_only_gaps_of_about_23_points():
    assert detectable_at([1] * 36, [1] * 36, 36, binary=True) == pytest.approx(2.801585 * 0.5 / 6, abs=1e-5)


def test_the_pilot_is_a_seeded_share_in_order():
    items = list(range(200))
    first = pilot_items(items, 0.2)
    assert len(first) == 40 and first == sorted(first) and first == pilot_items(items, 0.2)
    small = pilot_items(list(range(12)), 0.2)
    assert len(small) == 10 and small == sorted(small)  # at least 10


class _Card:
    def __init__(self, name):
        self.name = name


class _Cand:
    def __init__(self, name, run):
        self.card, self.runs = _Card(name), [run]


def test_plan_names_the_leader_and_says_when_a_split_cannot_separate():
    from eval.summary import RunSummary
    from eval.task import find_task

    task = find_task("style")

    def run(values):
        return RunSummary(
            "r", task, "test", "gen", "m", [{"scores": {"style_accuracy": v}} for v in values], 0, 0
        )

    a = [1.0] * 7 + [0.0] * 3  # 70%
    b = [1.0] * 5 + [0.0] * 5  # 50%: discordant on 2 of 10
    rows = plan([_Cand("b", run(b)), _Cand("a", run(a))], ["style_accuracy"], [36])
    (row,) = rows
    assert (row["leader"], row["other"], row["pilot"], row["size"]) == ("a", "b", 10, 36)
    assert row["gap"] == pytest.approx(0.2) and row["spread"] == pytest.approx(0.2)
    assert row["needed_for_gap"] == math.ceil(
        (Z975 * math.sqrt(0.2) + Z80 * math.sqrt(0.2 - 0.04)) ** 2 / 0.04
    )
    assert row["needed_for_gap"] == 37 and not row["separable"]  # 37 > the split's 36


def test_plan_through_the_command_line_scores_a_pilot_and_writes_no_selection(tmp_path, capsys):
    from selectune.cli import main
    from tests.test_endpoint import pairs_suite

    args = pairs_suite(tmp_path, 40)
    assert main([*args, "--plan", "--pilot", "0.5", "--detect", "0.1"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("- pairs-dev ppl accuracy:"))
    assert line == (
        "- pairs-dev ppl accuracy: a - b = 0.0 on 20 pilot items (discordance 0.00): no gap or no "
        "variation in the pilot to plan from; the split (40 items) cannot separate them: it detects only "
        "gaps of about 22.1"
    )
    assert not (tmp_path / "runs" / "selection.json").exists()
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--plan", "--pilot", "1.5"])
    assert exit_.value.code == 2 and "expected a share between 0 and 1, got 1.5" in capsys.readouterr().err
