"""One question through the whole mixture, and the table comparing a mixture with its proposers.

:func:`mixture_answer` asks the proposers concurrently, then aggregates by mode (a vote, or
synthesis); the MLflow pyfunc in :mod:`kubetune.methods.moa.pyfunc` calls it for each row.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.methods.moa.proposers import Messages, Proposer, as_messages, ask_all
from kubetune.methods.moa.synthesis import synthesize
from kubetune.methods.moa.voting import accuracy, majority_vote, weighted_vote


MODES = ("majority", "weighted", "synthesis")


@dataclass
class MoAAnswer:
    """A mixture's answer to one prompt.

    Attributes:
        answer: The final answer (normalised for vote modes, free text for synthesis);
            ``None`` when every proposer was dropped in a vote mode.
        proposals: Proposer name → answer, for the proposers that answered.
        dropped: Proposer (or ``layerN/agent``) name → why it was dropped.
        tokens: Tokens generated in total for this answer (proposers + aggregation).
        latency_s: Wall time for this answer.
    """

    answer: str | None
    proposals: dict[str, str]
    dropped: dict[str, str]
    tokens: int
    latency_s: float


def mixture_answer(
    proposers: Sequence[Proposer],
    prompt: str | Messages,
    *,
    mode: str = "majority",
    weights: Mapping[str, float] | None = None,
    labels: Sequence[str] | None = None,
    aggregator: Proposer | None = None,
    layers: int = 1,
    timeout: float = 60.0,
    max_new_tokens: int | None = None,
) -> MoAAnswer:
    """Ask the proposers concurrently, then aggregate by ``mode``.

    Args:
        proposers: The mixture's proposers.
        prompt: The user's prompt or conversation.
        mode: ``majority``, ``weighted`` (needs ``weights``) or ``synthesis`` (needs
            ``aggregator``).
        weights: Proposer name → weight, from :func:`fit_weights`.
        labels: The label set for vote modes on a classification task.
        aggregator: The synthesis model.
        layers: Synthesis layers.
        timeout: Deadline in seconds for each round of calls.
        max_new_tokens: Generation budget per call.

    Returns:
        A :class:`MoAAnswer`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    round_ = ask_all(proposers, as_messages(prompt), timeout=timeout, max_new_tokens=max_new_tokens)
    tokens = sum(c.tokens for c in round_.completions.values())
    dropped = dict(round_.dropped)
    if mode == "majority":
        answer = majority_vote(round_.texts, labels)
    elif mode == "weighted":
        if weights is None:
            raise ValueError("mode 'weighted' needs weights (see fit_weights)")
        answer = weighted_vote(round_.texts, weights, labels)
    else:
        if aggregator is None:
            raise ValueError("mode 'synthesis' needs an aggregator")
        syn = synthesize(
            aggregator, prompt, round_.texts, layers=layers, timeout=timeout, max_new_tokens=max_new_tokens
        )
        answer, tokens = syn.text, tokens + syn.tokens
        dropped.update(syn.dropped)
    return MoAAnswer(
        answer=answer,
        proposals=round_.texts,
        dropped=dropped,
        tokens=tokens,
        latency_s=time.perf_counter() - t0,
    )


def comparison_table(
    predictions: Mapping[str, Sequence[str | None]],
    references: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    tokens: Mapping[str, Sequence[int]] | None = None,
    latency_s: Mapping[str, Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Rows comparing each proposer and each mixture mode on the same references.

    Args:
        predictions: Row name (a proposer, or ``moa/<mode>``) → answers.
        references: The reference answers.
        labels: The label set, if the task has one.
        tokens: Row name → tokens generated per answer (cost).
        latency_s: Row name → seconds per answer.

    Returns:
        One dict per row: ``name``, ``accuracy``, ``tokens_per_answer``, ``latency_s``.
    """
    rows = []
    for name, preds in predictions.items():
        tok = (tokens or {}).get(name)
        lat = (latency_s or {}).get(name)
        rows.append(
            {
                "name": name,
                "accuracy": accuracy(preds, references, labels),
                "tokens_per_answer": sum(tok) / len(tok) if tok else None,
                "latency_s": sum(lat) / len(lat) if lat else None,
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`comparison_table` rows (for the run's closing note)."""

    def cell(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| name | accuracy | tokens/answer | latency s |", "|---|---|---|---|"]
    lines += [
        f"| {r['name']} | {cell(r['accuracy'])} | {cell(r['tokens_per_answer'])} | {cell(r['latency_s'])} |"
        for r in rows
    ]
    return "\n".join(lines)
