"""What the review votes add up to: win/tie/loss per system pair with Wilson CIs, the position-bias
test, and Bradley-Terry strengths, plain and with style (length, emoji, punctuation) controlled."""

from __future__ import annotations


def wilson(k: int, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def position_bias(first_wins: int, decisive: int) -> dict:
    """The one position-bias test: the share of decisive verdicts won by the answer shown first
    (left), its Wilson CI and the exact binomial p against 50%; None values with no decisive one."""
    from scipy.stats import binomtest

    if not decisive:
        return {"rate": None, "ci95": [None, None], "p_value": None}
    return {
        "rate": first_wins / decisive,
        "ci95": list(wilson(first_wins, decisive)),
        "p_value": float(binomtest(first_wins, decisive, 0.5).pvalue),
    }


def aggregate(all_votes: list[dict]) -> dict:
    """Win/tie/loss per system pair with Wilson CIs, Bradley-Terry strengths plain and
    style-controlled (when the votes carry the answers), and the position-bias check (how often the
    left answer wins decisive votes)."""
    pairs: dict[tuple[str, str], dict] = {}
    left_wins = decisive = 0
    for v in all_votes:
        a, b = sorted((v["system_a"], v["system_b"]))
        cell = pairs.setdefault((a, b), {"a": a, "b": b, "wins_a": 0, "wins_b": 0, "ties": 0, "both_bad": 0})
        if v["vote"] in ("left", "right"):
            winner = v["left_system"] if v["vote"] == "left" else (b if v["left_system"] == a else a)
            cell["wins_a" if winner == a else "wins_b"] += 1
            decisive += 1
            left_wins += v["vote"] == "left"
        else:
            cell["ties" if v["vote"] == "tie" else "both_bad"] += 1
    rows = []
    for cell in pairs.values():
        n = cell["wins_a"] + cell["wins_b"]
        low, high = wilson(cell["wins_a"], n)
        rows.append(
            {
                **cell,
                "votes": n + cell["ties"] + cell["both_bad"],
                "decisive": n,
                "win_rate_a": cell["wins_a"] / n if n else None,
                "ci95": [low, high],
            }
        )
    position = (
        {"left_wins": left_wins, "decisive": decisive, **position_bias(left_wins, decisive)}
        if decisive
        else None
    )
    systems = sorted({s for key in pairs for s in key})
    comments = [
        {
            k: v[k]
            for k in ("task", "item_id", "system_a", "system_b", "left_system", "vote", "reviewer", "comment")
        }
        for v in all_votes
        if v["comment"].strip()
    ]
    plain = bradley_terry(all_votes, systems) if len(systems) > 1 else None
    styled = (
        bradley_terry(all_votes, systems, style=True)
        if len(systems) > 1 and all("output_a" in v for v in all_votes)
        else None
    )
    if styled and styled["estimable"]:
        by_system = {r["system"]: r["log_strength"] for r in plain["rows"]} if plain["estimable"] else {}
        for r in styled["rows"]:
            r["plain"] = by_system.get(r["system"])
    return {
        "pairs": rows,
        "position": position,
        "systems": systems,
        "votes": len(all_votes),
        "comments": comments,
        "reviewers": len({v["reviewer"] for v in all_votes}),
        "bradley_terry": plain,
        "style_controlled": styled,
    }


STYLE_FEATURES = ("length", "emoji", "punctuation")


def style_counts(text: str) -> tuple[int, int, int]:
    """An answer's style covariates: characters, emoji (the `emoji` package's count) and
    punctuation marks (Unicode category P*, Chinese and ASCII alike)."""
    import unicodedata

    import emoji

    return len(text), emoji.emoji_count(text), sum(unicodedata.category(ch).startswith("P") for ch in text)


def bradley_terry(all_votes: list[dict], systems: list[str], *, style: bool = False) -> dict:
    """Bradley-Terry strengths as a logistic regression without intercept (a tie counts half a
    win each way; 'both bad' says nothing about order and is left out). The first system is the
    reference with log-strength 0.

    With `style`, as FastChat's style control: each vote also carries, per style feature, the
    normalised difference (a - b) / (a + b) of the two answers' counts, divided by its root mean
    square over the votes (not centred, so the fit does not depend on which system of a pair is
    called a); the strengths are then those left once length, emoji and punctuation are
    accounted for, and each feature's coefficient says how much it sways a vote."""
    import numpy as np
    import statsmodels.api as sm

    index = {s: k for k, s in enumerate(systems)}
    x, y, diffs = [], [], []
    for v in all_votes:
        if v["vote"] == "both_bad":
            continue
        a, b = v["system_a"], v["system_b"]
        row = np.zeros(len(systems))
        row[index[a]], row[index[b]] = 1.0, -1.0
        right = b if v["left_system"] == a else a
        winner = {"left": v["left_system"], "right": right}.get(v["vote"])
        x.append(row[1:])
        y.append(0.5 if winner is None else float(winner == a))
        if style:
            fa, fb = (
                np.array(style_counts(v["output_a"]), float),
                np.array(style_counts(v["output_b"]), float),
            )
            total = fa + fb
            diffs.append(np.divide(fa - fb, total, out=np.zeros_like(total), where=total > 0))
    features: list[str] = []
    if style and diffs:
        d = np.asarray(diffs)
        rms = np.sqrt((d**2).mean(axis=0))
        keep = rms > 0  # a feature equal in every pair says nothing
        features = [f for f, k in zip(STYLE_FEATURES, keep) if k]
        x = [np.concatenate([row, dv[keep] / rms[keep]]) for row, dv in zip(x, d)]
    if len(y) < len(systems) + len(features):
        return {
            "estimable": False,
            "why": f"{len(y)} ordered votes for {len(systems)} systems"
            + (f" and {len(features)} style features" if features else ""),
        }
    import warnings

    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PerfectSeparationWarning)
            fit = sm.GLM(np.asarray(y), np.asarray(x), family=sm.families.Binomial()).fit()
    except PerfectSeparationWarning:
        return {"estimable": False, "why": "one system wins or loses every vote (perfect separation)"}
    except (ValueError, np.linalg.LinAlgError) as exc:  # e.g. systems never compared with the rest
        return {"estimable": False, "why": f"the fit failed: {exc}"}
    m = len(systems) - 1
    params = np.concatenate([[0.0], fit.params[:m]])
    ses = np.concatenate([[0.0], fit.bse[:m]])
    if not np.all(np.isfinite(fit.params)) or np.any(np.abs(fit.params) > 20):
        return {"estimable": False, "why": "one system wins or loses every vote (perfect separation)"}
    strengths = np.exp(params) / np.exp(params).sum()
    order = np.argsort(-params)
    out = {
        "estimable": True,
        "reference": systems[0],
        "rows": [
            {
                "system": systems[k],
                "log_strength": float(params[k]),
                "se": float(ses[k]),
                "share": float(strengths[k]),
            }
            for k in order
        ],
    }
    if style:
        out["features"] = [
            {
                "feature": f,
                "coef": float(fit.params[m + j]),
                "se": float(fit.bse[m + j]),
                "p_value": float(fit.pvalues[m + j]),
            }
            for j, f in enumerate(features)
        ]
        out["constant"] = [f for f in STYLE_FEATURES if f not in features]
    return out
