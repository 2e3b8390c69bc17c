"""Stage `evaluate_moa`: each proposer alone vs the mixture in every mode, on the same examples.

Scores on the eval half of the validation split (the half ``aggregate_moa`` did not fit on):
accuracy after answer normalisation, cost (tokens generated per answer: the proposers' plus
the aggregator's) and latency (per answer, as served: proposers run concurrently, so the
slowest of them, plus the aggregator's layers). The vote modes are computed from the
proposers' recorded answers (greedy decoding, so the served mixture gives the same); the
synthesis mode runs the aggregator on them. Then the saved pyfunc itself answers a few
examples end to end, which checks that the registered model loads and agrees, and measures
its real latency.

Writes ``eval.json`` in the schema ``register`` reads: the candidate is the mixture in its
configured mode, the base is the best single proposer, the champion is the current
registered one (its recorded ``eval.*`` tags reused when its evaluation data matches).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.core.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.lib.report import EvalReport
from kubetune.tracking import RunContext, log_metrics, maybe_stage

METRIC = "accuracy"


@dataclass
class EvaluateMoAConfig:
    model_name: str = setting("", "Registered model whose 'champion' to compare with ('' = no comparison).")
    min_improvement: float = setting(0.0, "Accuracy margin the mixture must beat the champion (and the best "
                                          "single proposer) by.")
    modes: str = setting("majority,weighted,synthesis", "Mixture modes to report (comma-separated); the "
                                                        "mixture's own mode is always scored.")
    batch_size: int = setting(8, "Prompts per generate call of the synthesis aggregator.")
    served_examples: int = setting(2, "Examples the saved pyfunc answers end to end (0 = skip the check).")

    def __post_init__(self):
        unknown = {m.strip() for m in self.modes.split(",") if m.strip()} - {"majority", "weighted", "synthesis"}
        if unknown:
            raise ConfigError(f"'modes' may name majority, weighted, synthesis; got {sorted(unknown)}")
        if self.batch_size < 1 or self.served_examples < 0:
            raise ConfigError("'batch_size' must be >= 1 and 'served_examples' >= 0")


@dataclass
class EvaluateMoAResult:
    report: EvalReport
    output_path: str


def _row(name: str, preds, refs, labels, tokens, latency) -> dict:
    from kubetune.methods import moa

    return {"name": name, "accuracy": moa.accuracy(preds, refs, labels),
            "tokens_per_answer": sum(tokens) / len(tokens), "latency_s": sum(latency) / len(latency)}


def mixture_rows(desc: dict, proposals: dict, modes: list[str], model_dir: Path, batch_size: int):
    """Rows for each proposer and each mode on the eval half, plus the mixture's predictions."""
    from kubetune.methods import moa

    names, labels, idx = proposals["names"], proposals["labels"], desc["eval"]
    refs = [proposals["references"][i] for i in idx]
    ans = {n: {k: [proposals["answers"][n][k][i] for i in idx] for k in ("text", "tokens", "latency_s")}
           for n in names}
    rows = [_row(n, ans[n]["text"], refs, labels, ans[n]["tokens"], ans[n]["latency_s"]) for n in names]
    per_example = [{n: ans[n]["text"][j] for n in names} for j in range(len(idx))]
    # Served, the proposers answer concurrently: a round costs the sum of their tokens and
    # takes as long as the slowest of them.
    tokens = [sum(ans[n]["tokens"][j] for n in names) for j in range(len(idx))]
    latency = [max(ans[n]["latency_s"][j] for n in names) for j in range(len(idx))]
    predictions = {}
    for mode in modes:
        if mode == "majority":
            predictions[mode] = [moa.majority_vote(p, labels) for p in per_example]
            rows.append(_row("moa/majority", predictions[mode], refs, labels, tokens, latency))
        elif mode == "weighted":
            predictions[mode] = [moa.weighted_vote(p, desc["weights"], labels) for p in per_example]
            rows.append(_row("moa/weighted", predictions[mode], refs, labels, tokens, latency))
        elif mode == "synthesis":
            spec = dict(desc["aggregator"])
            if spec.get("kind") == "local" and not Path(spec["path"]).is_absolute() and \
                    (model_dir / spec["path"]).exists():
                spec["path"] = str(model_dir / spec["path"])  # the tuned aggregator in the model folder
            aggregator = moa.proposer_from_spec(spec)
            prompts = [proposals["prompts"][i] for i in idx]
            out = moa.synthesize_batch(aggregator, prompts, per_example, layers=desc["layers"],
                                       max_new_tokens=desc["max_new_tokens"], batch_size=batch_size)
            predictions[mode] = [c.text for c in out]
            rows.append(_row("moa/synthesis", predictions[mode], refs, labels,
                             [t + c.tokens for t, c in zip(tokens, out)],
                             [lat + c.latency_s for lat, c in zip(latency, out)]))
    return rows, predictions


def served_check(model_dir: Path, prompts: list, expected: list, labels) -> dict:
    """Load the saved pyfunc as ``register`` will serve it and answer ``prompts`` one at a time."""
    import mlflow.pyfunc
    import pandas as pd

    from kubetune.methods import moa

    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(str(model_dir))
    load_s = time.perf_counter() - t0
    latencies, agree, dropped = [], 0, 0
    for prompt, want in zip(prompts, expected):
        t0 = time.perf_counter()
        out = model.predict(pd.DataFrame({"prompt": [prompt]}))
        latencies.append(time.perf_counter() - t0)
        answer = out["answer"].iloc[0]
        agree += moa.normalize_answer(answer, labels) == moa.normalize_answer(want, labels)
        dropped += len(json.loads(out["dropped"].iloc[0]))
    return {"served_load_s": load_s, "served_latency_s": sum(latencies) / len(latencies),
            "served_agreement": agree / len(prompts), "served_dropped": dropped}


def _champion(model_name: str, eval_fp: str, prompts: list, refs: list, labels) -> tuple[dict | None, str | None]:
    """The current champion's numbers on the eval half: recorded tags when the eval data
    matches, else by running it (a MoA pyfunc, or any model folder kubetune registered)."""
    from kubetune.methods import moa
    from kubetune import tracking

    tracking.configure()
    holder = tracking.get_alias(model_name, tracking.CHAMPION)
    if holder is None:
        return None, None
    if holder.tags.get("kubetune.eval_fingerprint") == eval_fp and f"eval.{METRIC}" in holder.tags:
        return ({k[len("eval."):]: float(v) for k, v in holder.tags.items() if k.startswith("eval.")},
                str(holder.version))
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_version(model_name, holder.version, tmp)
        if (path / "MLmodel").exists():
            import mlflow.pyfunc
            import pandas as pd

            texts = [m[-1]["content"] for m in prompts]
            preds = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"prompt": texts}))["answer"].tolist()
        else:
            preds = [c.text for c in moa.LocalProposer(path, name="champion").batch(prompts)]
    return {METRIC: moa.accuracy(preds, refs, labels)}, str(holder.version)


def evaluate_moa(cfg: EvaluateMoAConfig, model_dir: str | Path, proposals_path: str | Path,
                 output_path: str | Path, ctx: RunContext | None = None) -> EvaluateMoAResult:
    """Score every proposer and the mixture, compare with the champion, write ``eval.json``.

    Args:
        cfg: Evaluation settings.
        model_dir: Output of ``aggregate_moa`` (the mixture model folder).
        proposals_path: ``proposals.json`` written by ``aggregate_moa``.
        output_path: Where ``eval.json`` is written.
        ctx: When given, logs to an MLflow child run named ``evaluate-moa``.

    Returns:
        The report: rows per proposer and mode, the candidate, base, champion and verdict.
    """
    from kubetune import tracking
    from kubetune.methods import moa

    model_dir = Path(model_dir)
    desc = json.loads((model_dir / "moa.json").read_text())
    proposals = json.loads(Path(proposals_path).read_text())
    modes = [m.strip() for m in cfg.modes.split(",") if m.strip()]
    if desc["mode"] not in modes:
        modes.append(desc["mode"])
    if desc["aggregator"] is None:
        modes = [m for m in modes if m != "synthesis"]
    labels = proposals["labels"]
    idx = desc["eval"]
    prompts = [proposals["prompts"][i] for i in idx]
    refs = [proposals["references"][i] for i in idx]

    with maybe_stage(ctx, "evaluate-moa", params=asdict(cfg)) as run:
        rows, predictions = mixture_rows(desc, proposals, modes, model_dir, cfg.batch_size)
        by_name = {r["name"]: r for r in rows}
        single = [by_name[n] for n in proposals["names"]]
        best = max(single, key=lambda r: r[METRIC])  # ties: the earlier proposer
        candidate = {k: v for k, v in by_name[f"moa/{desc['mode']}"].items() if k != "name"}
        n_served = min(cfg.served_examples, len(idx))
        if n_served and all(len(m) == 1 for m in prompts[:n_served]):
            candidate.update(served_check(model_dir, [m[0]["content"] for m in prompts[:n_served]],
                                          predictions[desc["mode"]][:n_served], labels))
        champion, champion_version = (None, None)
        if cfg.model_name:
            champion, champion_version = _champion(cfg.model_name, desc["eval_fingerprint"], prompts, refs, labels)
        if champion is not None and METRIC not in champion:
            raise StageError(f"evaluate_moa: champion v{champion_version} has no '{METRIC}' to compare with")
        table = moa.format_table(rows)
        report = EvalReport(
            primary_metric=METRIC, candidate=candidate, base={k: v for k, v in best.items() if k != "name"},
            base_name=best["name"], champion=champion, champion_version=champion_version,
            min_improvement=cfg.min_improvement, forgetting=None, data_fingerprint=desc["eval_fingerprint"],
            validation_examples=len(idx),
            details={"mode": desc["mode"], "weights": desc["weights"], "rows": rows, "table": table})
        if run is not None:
            report.log(tracking)
            for r in rows:
                log_metrics({f"{r['name'].replace('/', '_')}_{k}": v for k, v in r.items() if k != "name"})
            tracking.log_text(table + "\n", "moa_table.md")
    report.save(output_path)
    return EvaluateMoAResult(report=report, output_path=str(output_path))
