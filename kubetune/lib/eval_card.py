"""The evaluation card: candidate vs base vs champion, samples and the verdict, as Markdown.

evaluate's component writes it to a ``dsl.Markdown`` output, which the KFP UI renders in the
run's artifact view; the same text is logged to the evaluate run in MLflow.
"""

from __future__ import annotations

from kubetune.lib.report import EvalReport, lower_is_better
from kubetune.lib.text_metrics import exact_match

ORDER = ("exact_match", "field_accuracy", "rouge_l", "val_loss", "val_perplexity", "general_perplexity")


def _cell(text, tail: bool = False) -> str:
    # A table cell: one line, pipes escaped, long text cut (prompts from the front: their end is
    # the example, their start the shared instruction).
    text = " ".join(str(text).split()).replace("|", "\\|")
    if len(text) <= 120:
        return text
    return "..." + text[-117:] if tail else text[:117] + "..."


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render(report: EvalReport) -> str:
    """The card of one evaluation report."""
    metric = report.primary_metric
    cand, base, champ = report.candidate, report.base or {}, report.champion
    version = report.champion_version
    judged = report.judge()
    keys = [k for k in ORDER if k in cand] + sorted(k for k in cand if k.startswith("bench_"))
    champ_head = f"champion v{version}" if version is not None else "champion (none yet)"
    rows = []
    for k in keys:
        better = "lower" if lower_is_better(k) else "higher"
        rows.append(f"| {k}{' **(primary)**' if k == metric else ''} | {_num(cand.get(k))} | {_num(base.get(k))} | "
                    f"{_num((champ or {}).get(k))} | {better} |")
    forgetting = report.forgetting
    verdict = [
        f"- beats the base model on `{metric}`: **{'yes' if judged.beats_base else 'no'}**",
        f"- beats the champion on `{metric}` (margin {report.min_improvement}): "
        f"**{'yes' if judged.beats_champion else 'no'}**"
        + ("" if version is not None else " (no champion yet)"),
        f"- forgetting (general-text perplexity vs base): {'n/a' if forgetting is None else f'{forgetting:+.1%}'}",
    ]
    if report.benchmark_gate:
        verdict.append(f"- benchmarks: {report.benchmark_gate}")
    samples = cand.get("samples") or []
    sample_rows = "\n".join(f"| {_cell(s['prompt'], tail=True)} | {_cell(s['reference'])} | {_cell(s['prediction'])} | "
                            f"{'yes' if s.get('correct', _same(s)) else 'no'} |" for s in samples)
    out = [f"# Evaluation: candidate vs base vs {champ_head}", "",
           f"Primary metric `{metric}`; {report.validation_examples} validation examples, "
           f"data `{report.data_fingerprint or '?'}`.", "",
           "## Verdict", "", *verdict, "",
           "## Metrics", "", f"| metric | candidate | base | {champ_head} | better |", "|---|---|---|---|---|", *rows]
    if samples:
        out += ["", "## Samples (candidate)", "", "| prompt | reference | prediction | exact |", "|---|---|---|---|",
                sample_rows]
    return "\n".join(out) + "\n"


def _same(sample: dict) -> bool:
    return exact_match(sample["prediction"], sample["reference"])
