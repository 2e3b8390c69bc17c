"""Intervals on reported numbers: task metrics with n and a 95% interval, forgetting's paired interval,
and the registry gate that asks for more than the noise."""

from __future__ import annotations

import json
import math

import pytest

from kubetune.core import scoring
from kubetune.lib.report import EvalReport
from kubetune.lib.stats import relative_change_interval, wilson
from kubetune.lib.text_metrics import task_metrics
from kubetune.tracking.registry_ops import Gates, check_gates


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 48), (34, 48), (48, 48), (3, 10)])
def test_wilson_interval_is_wilsons(k, n):
    assert wilson(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)


def test_task_metrics_carry_n_and_an_interval_around_each_metric():
    ref = json.dumps({"product": "phone", "issue": "billing", "priority": "low"})
    wrong = json.dumps({"product": "phone", "issue": "billing", "priority": "high"})
    preds = [ref] * 34 + [wrong] * 14
    m = task_metrics(preds, [ref] * 48)
    assert m["n"] == 48 and m["exact_match"] == pytest.approx(34 / 48)
    assert (m["exact_match_ci_low"], m["exact_match_ci_high"]) == pytest.approx(_wilson_by_hand(34, 48))
    # field accuracy: 34 rows at 1, 14 at 2/3 -> a t interval around the mean, strictly inside [2/3, 1]
    assert 2 / 3 < m["field_accuracy_ci_low"] < m["field_accuracy"] < m["field_accuracy_ci_high"] < 1
    assert m["rouge_l_ci_low"] <= m["rouge_l"] <= m["rouge_l_ci_high"]


def test_forgetting_interval_pairs_lines_and_brackets_the_pooled_change(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    changed = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)
    texts = [line for line in scoring.GENERAL_TEXT.read_text().splitlines() if line.strip()][:24]
    b_sums, counts = scoring.line_losses(base, tok, texts, batch_size=5)
    c_sums, c_counts = scoring.line_losses(changed, tok, texts, batch_size=7)
    assert counts == c_counts and len(counts) == 24
    # the per-line sums pool to the loss the model itself computes (an independent computation)
    assert math.exp(sum(b_sums) / sum(counts)) == pytest.approx(
        math.exp(scoring.validation_loss(base, [{"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))}
                                           for ids in (tok(t, add_special_tokens=False)["input_ids"] for t in texts)],
                                    tok.pad_token_id, 24)), rel=1e-4)
    change = math.exp((sum(c_sums) - sum(b_sums)) / sum(counts)) - 1
    low, high = relative_change_interval(c_sums, b_sums, counts)
    assert low < change < high and high - low < 0.5
    assert relative_change_interval(b_sums, b_sums, counts) == pytest.approx((0.0, 0.0))


def _report(cand: float, champ: float, n: int = 48):
    def scores(p):
        low, high = wilson(round(p * n), n)
        return {"exact_match": p, "exact_match_ci_low": low, "exact_match_ci_high": high, "n": n}
    return scores(cand), scores(champ)


def _eval(cand: dict, champ: dict) -> EvalReport:
    return EvalReport("exact_match", cand, champion=champ, champion_version="1")


def test_gate_beyond_noise_refuses_a_win_inside_the_noise_and_is_off_by_default():
    cand, champ = _report(0.5, 0.42)  # +0.08 on 48 examples each: well inside the noise (~±0.14 each)
    plain = check_gates(_eval(cand, champ), Gates(require_complete=False))
    assert plain.promote
    strict = check_gates(_eval(cand, champ), Gates(require_complete=False, beyond_noise=True))
    assert not strict.promote and "noise" in strict.checks["champion"]
    cand, champ = _report(0.9, 0.4)
    assert check_gates(_eval(cand, champ), Gates(require_complete=False, beyond_noise=True)).promote
    # no interval recorded for the champion (an older version): the gate cannot judge, and says so
    del champ["exact_match_ci_low"]
    decision = check_gates(_eval(cand, champ), Gates(require_complete=False, beyond_noise=True))
    assert not decision.promote and "interval" in decision.checks["champion"]


def test_run_summary_prints_n_and_the_intervals():
    from kubetune.ops.runner import format_summary

    text = format_summary({"pipeline": "peft", "primary_metric": "exact_match", "base": 0.0, "candidate": 0.5,
                           "candidate_ci": [0.361, 0.639], "n": 48, "forgetting": 0.04,
                           "forgetting_ci": [0.021, 0.06], "aliases": []})
    assert "tuned 0.5000 [95% interval 0.361-0.639, n=48]" in text
    assert "+4.0% [95% interval +2.1% to +6.0%]" in text


def test_paired_difference_by_hand():
    from kubetune.lib.stats import paired_difference

    # differences 1, 0, 0, 1: mean 0.5, sd sqrt(1/3), t(0.975, 3) = 3.182446 -> half-width 0.918693
    got = paired_difference("exact_match", [1, 1, 0, 1], [0, 1, 0, 0])
    assert got["exact_match_vs_base"] == 0.5 and (got["exact_match_better"], got["exact_match_worse"]) == (2, 0)
    assert abs(got["exact_match_vs_base_ci_low"] - (0.5 - 0.918693)) < 1e-5
    assert abs(got["exact_match_vs_base_ci_high"] - (0.5 + 0.918693)) < 1e-5
    with pytest.raises(ValueError, match="same examples"):
        paired_difference("exact_match", [1, 0], [1])
