"""Answer-vs-reference metrics over text: exact match, field accuracy, ROUGE-L.

Pure functions over strings (no model, no torch), so evaluation, the RL reward functions and the
evaluation card all judge "equal" the same way.
"""

from __future__ import annotations

import json


def _parse_json(text: str):
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def exact_match(pred: str, ref: str) -> bool:
    """Equal after stripping; if the reference is JSON, equal as parsed objects."""
    ref_obj = _parse_json(ref)
    if ref_obj is not None:
        return _parse_json(pred) == ref_obj
    return " ".join(pred.split()).lower() == " ".join(ref.split()).lower()


def field_accuracy(pred: str, ref: str) -> float | None:
    """Share of the reference JSON object's fields that the prediction gets right."""
    ref_obj = _parse_json(ref)
    if not isinstance(ref_obj, dict) or not ref_obj:
        return None
    pred_obj = _parse_json(pred)
    if not isinstance(pred_obj, dict):
        return 0.0
    return sum(pred_obj.get(k) == v for k, v in ref_obj.items()) / len(ref_obj)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens (the LCS recurrence of Lin, 2004).

    Ours rather than the ``rouge-score`` package: it is a dozen lines, and the package pulls
    nltk and absl into the image for this one function.
    """
    a, b = pred.lower().split(), ref.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def per_example(preds: list[str], refs: list[str]) -> dict[str, list[float]]:
    """Each example's exact match (0/1) and ROUGE-L, for comparing two models example by example."""
    return {"exact_match": [float(exact_match(p, r)) for p, r in zip(preds, refs)],
            "rouge_l": [rouge_l(p, r) for p, r in zip(preds, refs)]}


def task_metrics(preds: list[str], refs: list[str], scores: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Each task metric with its 95% interval (``<metric>_ci_low/high``) and the number of examples ``n``.

    Args:
        scores: ``per_example(preds, refs)`` when the caller keeps it too (it is not computed twice).
    """
    from kubetune.lib.stats import with_interval

    scores = scores or per_example(preds, refs)
    out = {"n": len(refs), **with_interval("exact_match", scores["exact_match"], proportion=True),
           **with_interval("rouge_l", scores["rouge_l"])}
    fields = [field_accuracy(p, r) for p, r in zip(preds, refs)]
    if all(f is not None for f in fields):
        out.update(with_interval("field_accuracy", fields))
    return out
