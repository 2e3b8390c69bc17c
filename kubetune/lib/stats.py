"""95% intervals for the numbers kubetune reports: how far a score on n examples can be trusted.

A score on 48 validation tickets moves by ±0.13 from sampling alone, so every task metric goes out
with its n and an interval, and two scores are called different only beyond that noise.
The intervals come from scipy.stats: Wilson's for proportions (exact match; it stays inside
[0, 1] and is not degenerate at 0 or 1 like the normal approximation), Student's t for means of
per-example scores (ROUGE-L, field accuracy), and a paired bootstrap over lines for a ratio of two
models' perplexities on the same text (forgetting).

Examples are treated as independent. With a grouped split the validation rows come in groups
(the bundled tickets: 48 rows in 8 answers), so the true uncertainty is wider than shown.
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    from scipy.stats import binomtest

    if n < 1:
        return (math.nan, math.nan)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (a point when they are all equal or n = 1)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (mean - half, mean + half)


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of repeated runs; sd 0 for a single run."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def with_interval(name: str, per_example: list[float], proportion: bool = False) -> dict[str, float]:
    """``{name, name_ci_low, name_ci_high}`` from per-example scores (0/1 when ``proportion``)."""
    n = len(per_example)
    value = sum(per_example) / n
    low, high = wilson(round(sum(per_example)), n) if proportion else mean_interval(per_example)
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}


def paired_difference(name: str, new: list[float], old: list[float]) -> dict[str, float]:
    """Two models scored on the same examples: the mean of ``new - old`` with its 95% interval.

    Pairing removes what the examples share (an easy ticket is easy for both), so the interval is
    much narrower than two separate intervals' overlap suggests, and it is the one that says
    whether the candidate beat the model it started from.

    Returns:
        ``{name}_vs_base``, ``..._ci_low``, ``..._ci_high`` (Student t over the per-example
        differences), ``{name}_better`` and ``{name}_worse`` (examples that went up or down).
    """
    if len(new) != len(old) or not new:
        raise ValueError(f"paired_difference: {len(new)} and {len(old)} scores; need the same examples, at least one")
    diffs = [a - b for a, b in zip(new, old)]
    low, high = mean_interval(diffs)
    return {f"{name}_vs_base": sum(diffs) / len(diffs), f"{name}_vs_base_ci_low": low,
            f"{name}_vs_base_ci_high": high, f"{name}_better": float(sum(d > 0 for d in diffs)),
            f"{name}_worse": float(sum(d < 0 for d in diffs))}


def relative_change_interval(new_sums: list[float], old_sums: list[float], counts: list[int],
                             confidence: float = CONFIDENCE, resamples: int = 2000,
                             seed: int = 0) -> tuple[float, float]:
    """Interval of ``exp((Σ new − Σ old) / Σ counts) − 1`` by a paired bootstrap over items.

    For perplexity: ``new_sums[i]``/``old_sums[i]`` are two models' summed token losses on line
    i and ``counts[i]`` its token count, so the statistic is the relative change of the pooled
    perplexity. Pairing by line removes the lines' own difficulty from the noise, which is what
    lets a modest probe resolve a few percent.
    """
    import numpy as np
    from scipy.stats import bootstrap

    def stat(new, old, cnt, axis=-1):
        return np.expm1((new.sum(axis=axis) - old.sum(axis=axis)) / cnt.sum(axis=axis))

    if len(counts) < 2:
        value = float(stat(np.array(new_sums), np.array(old_sums), np.array(counts)))
        return (value, value)
    res = bootstrap((np.array(new_sums), np.array(old_sums), np.array(counts, dtype=float)), stat, paired=True,
                    vectorized=True, n_resamples=resamples, confidence_level=confidence, method="percentile",
                    random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def half_width(scores: dict, metric: str) -> float | None:
    """Half the width of ``metric``'s interval in a scores dict, or None when it has none."""
    low, high = scores.get(f"{metric}_ci_low"), scores.get(f"{metric}_ci_high")
    if low is None or high is None or any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return None
    return (float(high) - float(low)) / 2
