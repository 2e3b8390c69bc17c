"""Voting: the proposers' answers normalised and counted, plainly or with fitted weights.

:func:`majority_vote` counts normalised answers; :func:`weighted_vote` weighs them with
:func:`fit_weights` (the "tuning at the aggregator level", fitted on validation answers).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence


_PREFIX = re.compile(r"^(the\s+)?(final\s+)?(answer|label|class|category)\s*(is)?\s*[:=\-]?\s*", re.I)
_EDGE = string.punctuation + string.whitespace + "“”‘’«»"


def normalize_answer(text: str | None, labels: Sequence[str] | None = None) -> str:
    """Reduce an answer to the form votes are counted on.

    First non-empty line, lower case, no "Answer:"-style prefix, no surrounding punctuation
    or quotes, single spaces. With ``labels`` (a classification task), the answer maps to
    the label it equals, else to the label named first in it, else stays as it is (and so
    agrees with no correct answer).

    Args:
        text: A model's answer.
        labels: The label set, if the task has one.

    Returns:
        The normalised answer ("" for an empty one).
    """
    if not text:
        return ""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    norm = " ".join(_PREFIX.sub("", line.strip()).strip(_EDGE).lower().split())
    if not labels:
        return norm
    canon = {" ".join(str(lab).lower().split()): str(lab).lower() for lab in labels}
    if norm in canon:
        return canon[norm]
    found = [(m.start(), lab) for key, lab in canon.items() if (m := re.search(rf"\b{re.escape(key)}\b", norm))]
    return min(found)[1] if found else norm


def label_set(references: Sequence[str], max_labels: int = 20, max_words: int = 3) -> list[str] | None:
    """The task's label set when the reference answers look like one, else ``None``.

    A classification-like task (where voting applies) has few distinct, short reference
    answers: at most ``max_labels`` of them, none longer than ``max_words`` words. Free-text
    tasks (a summary, a JSON record) get ``None`` and are voted on as normalised strings.

    Returns:
        The distinct normalised references, sorted; or ``None``.
    """
    distinct = sorted({normalize_answer(r) for r in references} - {""})
    if not distinct or len(distinct) > max_labels or any(len(d.split()) > max_words for d in distinct):
        return None
    return distinct


def _vote(answers: Mapping[str, str | None], weights: Mapping[str, float], labels) -> str | None:
    tally: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    for i, (name, text) in enumerate(answers.items()):
        norm = normalize_answer(text, labels)
        if not norm:
            continue  # an empty answer is an abstention, not a vote for ""
        tally[norm] = tally.get(norm, 0.0) + float(weights.get(name, 0.0))
        first_seen.setdefault(norm, i)
    if not tally:
        return None
    # Ties go to the answer given by the earliest proposer: deterministic, and callers list
    # proposers best first when they know the order.
    return max(tally, key=lambda a: (tally[a], -first_seen[a]))


def majority_vote(answers: Mapping[str, str | None] | Sequence[str | None], labels: Sequence[str] | None = None) -> str | None:
    """The most common normalised answer; ties go to the earliest proposer's answer.

    Args:
        answers: Proposer name → answer (or a plain list of answers). Dropped proposers are
            simply absent; empty answers abstain.
        labels: The label set, if the task has one (see :func:`normalize_answer`).

    Returns:
        The winning normalised answer, or ``None`` when nobody answered.
    """
    if not isinstance(answers, Mapping):
        answers = {str(i): a for i, a in enumerate(answers)}
    return _vote(answers, {name: 1.0 for name in answers}, labels)


def weighted_vote(
    answers: Mapping[str, str | None], weights: Mapping[str, float], labels: Sequence[str] | None = None
) -> str | None:
    """The normalised answer with the largest total weight of proposers behind it.

    Args:
        answers: Proposer name → answer; dropped proposers are absent.
        weights: Proposer name → weight, from :func:`fit_weights`. A proposer without a
            weight counts zero.
        labels: The label set, if the task has one.

    Returns:
        The winning normalised answer, or ``None`` when nobody answered.
    """
    return _vote(answers, weights, labels)


def accuracy(predictions: Sequence[str | None], references: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Share of predictions equal to the reference after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(
        bool(normalize_answer(p, labels)) and normalize_answer(p, labels) == normalize_answer(r, labels)
        for p, r in zip(predictions, references)
    )
    return hits / len(references)


def _vote_all(predictions: Mapping[str, Sequence[str]], weights: Mapping[str, float], labels) -> list[str | None]:
    n = len(next(iter(predictions.values())))
    return [_vote({name: preds[i] for name, preds in predictions.items()}, weights, labels) for i in range(n)]


def fit_weights(
    val_predictions: Mapping[str, Sequence[str]],
    val_labels: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Fit vote weights on validation answers: the tuning at the aggregator level.

    Each proposer gets the log-odds of its validation accuracy,
    ``w = log(p / (1 - p)) + log(K - 1)`` with ``p = (correct + 1) / (n + 2)`` (Laplace, so
    a perfect proposer gets a finite weight) and ``K`` the number of classes. This is the
    optimal weighted majority rule when proposers err independently and uniformly over the
    wrong classes (Nitzan & Paroush 1982); weights below zero (worse than chance) are
    clipped to zero. Chosen over a fitted logistic regression because validation sets here
    are tens to hundreds of examples: one closed-form number per proposer cannot overfit,
    needs no regularisation strength, and reads directly as "how much this proposer is
    trusted".

    Proposers do not err independently in practice (fine-tunes of one base share
    mistakes), so the log-odds weights are then checked against two other candidates on
    the same validation data: equal weights (plain majority) and all weight on the best
    single proposer. The candidate with the highest validation accuracy wins, ties going
    to log-odds; so on the validation data the weighted vote is never below the best
    single proposer nor below majority vote.

    Args:
        val_predictions: Proposer name → its answers on the validation examples.
        val_labels: The reference answers.
        labels: The label set, if the task has one; ``K`` is its size (else the number of
            distinct references, at least 2).

    Returns:
        Proposer name → weight (non-negative).
    """
    if not val_predictions:
        raise ValueError("fit_weights needs at least one proposer's validation predictions")
    n = len(val_labels)
    k = max(2, len(labels) if labels else len({normalize_answer(r) for r in val_labels}))
    acc = {name: accuracy(preds, val_labels, labels) for name, preds in val_predictions.items()}
    log_odds = {}
    for name, a in acc.items():
        p = (a * n + 1) / (n + 2)
        log_odds[name] = max(0.0, math.log(p / (1 - p)) + math.log(k - 1))
    best = max(acc, key=acc.get)
    candidates = [
        log_odds,
        {name: 1.0 for name in val_predictions},
        {name: float(name == best) for name in val_predictions},
    ]
    scores = [accuracy(_vote_all(val_predictions, w, labels), val_labels, labels) for w in candidates]
    return candidates[scores.index(max(scores))]
