"""Stage `register`: a new MLflow model version, `challenger` always, `champion` when earned.

Never registers from a failed or unevaluated run: the evaluation report must exist, say
``evaluated: true`` and carry the primary metric; the model folder must hold its manifest.
The champion moves only when the candidate beat the champion evaluate compared it with (or
there was none), passes the forgetting gate, and the alias still points where evaluate saw
it (compare-and-set under a registry lock, so two runs finishing together leave exactly one
champion). The gates are register's settings (``min_improvement``, ``max_forgetting``,
``require_complete``); their checks are ``kubetune.tracking.registry_ops.check_gates``, shared with
``kubetune promote``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.core.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.lib.report import EvalReport, numbers
from kubetune.serving.llm_pyfunc import log_model, register_logged
from kubetune.tracking.registry_ops import RUN_KEY_TAG, Decision, Gates, check_gates, model_card
from kubetune.tracking import RunContext, maybe_stage


# On each version: the pipeline run (and pipeline) that registered it, so a retry finds it.
REGISTER_KEY_TAG = "kubetune.registered_by"


@dataclass
class RegisterConfig:
    model_name: str = setting("", "Registered model name in MLflow.")
    max_forgetting: float = setting(-1.0, "Refuse champion if general perplexity rose by more than this "
                                          "fraction (0.1 = 10%); negative = no gate.")
    min_improvement: float = setting(0.0, "Margin the candidate must beat the champion by on the primary "
                                          "metric; the stricter of this and evaluate's margin applies.")
    require_complete: bool = setting(True, "Refuse champion unless the evaluation is complete: primary metric "
                                           "for candidate, base and champion, forgetting when gated.")
    not_worse_than_base: bool = setting(True, "Refuse champion to a candidate worse than the base model on the "
                                              "primary metric (MoA: the best single proposer), and to a first "
                                              "version that does not beat it.")
    beyond_noise: bool = setting(False, "Refuse champion unless the candidate beats the champion by more than the "
                                        "noise: the combined 95% intervals of both scores on the primary metric.")

    def __post_init__(self):
        if not self.model_name:
            raise ConfigError("'model_name' is required")
        if self.min_improvement < 0:
            raise ConfigError(f"'min_improvement' must be >= 0, got {self.min_improvement}")


@dataclass
class RegisterResult:
    version: str
    aliases: list[str]
    promoted: bool
    reason: str
    summary: dict


def _check_evaluated(report_path: Path, model_dir: Path) -> EvalReport:
    try:
        report = EvalReport.load(report_path)
    except StageError as e:
        raise StageError(f"register: {e}; refusing to register") from None
    if not (model_dir / "kubetune_method.json").exists():
        raise StageError(f"register: {model_dir} is not a complete trained model (no kubetune_method.json)")
    return report


def gates(report: EvalReport, cfg: RegisterConfig) -> Gates:
    """The gates in force: register's settings, with evaluate's margin if that is stricter."""
    return Gates(min_improvement=max(cfg.min_improvement, report.min_improvement),
                 max_forgetting=cfg.max_forgetting, require_complete=cfg.require_complete,
                 not_worse_than_base=cfg.not_worse_than_base, beyond_noise=cfg.beyond_noise)


def decide_all(report: EvalReport, cfg: RegisterConfig) -> Decision:
    """The gate checks on evaluate's numbers (see ``kubetune.tracking.registry_ops.check_gates``)."""
    return check_gates(report, gates(report, cfg))


def decide(report: EvalReport, cfg: RegisterConfig) -> tuple[bool, str]:
    """Whether the candidate earns `champion`, and why (in words that go on the version)."""
    d = decide_all(report, cfg)
    return d.promote, d.reason


def register(cfg: RegisterConfig, model_dir: str | Path, report_path: str | Path,
             ctx: RunContext | None = None) -> RegisterResult:
    """Register the trained model and move aliases as earned.

    The version carries every number behind the decision as tags (``eval.*``, ``base.*``,
    ``champion.*``, ``gate.*``), a model card (``README.md`` among its files, and its
    description), and links to this stage's MLflow run.

    Args:
        cfg: Registered model name and gates.
        model_dir: Output of a training stage.
        report_path: ``eval.json`` written by ``evaluate``.
        ctx: The pipeline run (lineage tags); registration always logs to MLflow.

    Returns:
        The version, its aliases, whether it was promoted and why.
    """
    from kubetune import tracking

    model_dir, report_path = Path(model_dir), Path(report_path)
    report = _check_evaluated(report_path, model_dir)
    manifest = json.loads((model_dir / "kubetune_method.json").read_text())
    metric = report.primary_metric
    # A pipeline run registers once per model: a retried task (same KFP run) finds its version.
    pipeline_run = f"{ctx.pipeline_run_id}/{ctx.pipeline}" if ctx is not None else None
    ctx = ctx or RunContext(model_name=cfg.model_name, pipeline_run_id="manual")
    decision = decide_all(report, cfg)
    promote, reason = decision.promote, decision.reason
    in_force = gates(report, cfg)
    champion = report.champion or {}
    with maybe_stage(ctx, "register", params=asdict(cfg)) as run:
        tracking.log_metrics(report.metrics())
        tags = {
            **tracking.lineage_tags(),
            "kubetune.pipeline_run_id": ctx.pipeline_run_id,
            "kubetune.pipeline": ctx.pipeline,
            "kubetune.base_model": manifest.get("base_model", ""),
            "kubetune.method": manifest.get("method", ""),
            "kubetune.data_fingerprint": manifest.get("data_fingerprint") or report.data_fingerprint,
            "kubetune.eval_fingerprint": report.validation_fingerprint or report.data_fingerprint,
            "kubetune.eval_key": report.eval_key or "",
            "kubetune.primary_metric": metric,
            **{f"eval.{k}": v for k, v in numbers(report.candidate).items()},
            **({"eval.forgetting": report.forgetting} if report.forgetting is not None else {}),
            **{f"base.{k}": v for k, v in numbers(report.base).items()},
            **{f"champion.{k}": v for k, v in numbers(champion).items()},
            **({"kubetune.champion_compared": report.champion_version}
               if report.champion_version is not None else {}),
            **decision.tags(in_force),
        }
        run_id = run.info.run_id if run is not None else None
        # The data size for the card: ingest's counts, from its run in this pipeline run.
        ingested = tracking.stage_metrics(ctx, "ingest")
        if "data_train" in ingested:
            manifest.setdefault("counts", {})["train"] = int(ingested["data_train"])
        if pipeline_run:
            tags[REGISTER_KEY_TAG] = pipeline_run
            tags[RUN_KEY_TAG] = tracking.pipeline_run_tags(ctx).get(RUN_KEY_TAG, "")
        # The card travels with the version's files (model/README.md) and is its description;
        # written before the version exists, so its decision line is the gates' verdict.
        provisional = model_card(cfg.model_name, "(new)", manifest, report, decision, in_force, ctx.pipeline,
                                 ctx.pipeline_run_id, run_id)
        tracking.log_text(provisional, "model/README.md")
        source = log_model(model_dir, card=provisional)  # the slow part, before the lock
        # Decide, then create the version once with its decision, under the champion's lock: a
        # lock that cannot be had fails the stage before anything is registered.
        with tracking.alias_lock(cfg.model_name, tracking.CHAMPION):
            mine = tracking.find_version(cfg.model_name, REGISTER_KEY_TAG, pipeline_run) if pipeline_run else None
            holder = _holder(cfg.model_name, tracking.CHAMPION)
            expected = report.champion_version
            if promote and holder not in (expected, mine and str(mine.version)):
                why = f"'champion' moved to version {holder} while this run was deciding (expected {expected})"
                promote, reason = False, f"not promoted: {why}"
                decision = Decision(False, reason, {**decision.checks, "alias": f"fail: {why}"})
            outcome = {"kubetune.decision": "promoted" if promote else "challenger",
                       "kubetune.decision_reason": reason, **decision.tags(in_force)}
            if mine is None:
                mv = register_logged(cfg.model_name, source, {**tags, **outcome}, description=provisional)
            else:  # a retry of this register task: its version exists, possibly without its aliases
                mv = mine
                tracking.set_version_tags(cfg.model_name, str(mv.version), outcome)
            version = str(mv.version)
            aliases = [tracking.CHALLENGER]
            newest = _holder(cfg.model_name, tracking.CHALLENGER)
            if newest is None or int(newest) < int(version):  # a retry does not take it from a newer one
                tracking.set_alias(cfg.model_name, tracking.CHALLENGER, version)
            if promote:
                aliases.append(tracking.CHAMPION)
                if holder != version:
                    tracking.set_alias(cfg.model_name, tracking.CHAMPION, version,
                                       note=f"pipeline run {ctx.pipeline_run_id}: {reason}")
        card = model_card(cfg.model_name, version, manifest, report, decision, in_force, ctx.pipeline,
                          ctx.pipeline_run_id, run_id)
        tracking.log_text(card, "model_card.md")
        tracking.set_version_description(cfg.model_name, version, card)
        tracking.set_tags({"kubetune.model_version": version, **outcome})
        if run is not None:
            tracking.tag_parent(run, {"kubetune.model_version": version, "kubetune.decision_reason": reason,
                                      "kubetune.status": "promoted" if promote else "challenger"})
        summary = {
            "model_name": cfg.model_name, "version": version, "aliases": aliases, "promoted": promote,
            "reason": reason, "primary_metric": metric, "candidate": report.candidate[metric],
            "base": (report.base or {}).get(metric), "champion_before": champion.get(metric),
            "forgetting": report.forgetting, "tracking_uri": tracking.tracking_uri(),
            "n": report.candidate.get("n"), "candidate_ci": _interval(report.candidate, metric),
            "vs_base": _paired(report.candidate, metric),
            "forgetting_ci": None if report.forgetting_ci_low is None or report.forgetting_ci_high is None
            else [report.forgetting_ci_low, report.forgetting_ci_high],
            "run_id": run_id, "gates": decision.checks,
        }
    return RegisterResult(version=version, aliases=aliases, promoted=promote, reason=reason, summary=summary)


def _interval(scores: dict, name: str) -> list[float] | None:
    low, high = scores.get(f"{name}_ci_low"), scores.get(f"{name}_ci_high")
    return None if low is None or high is None else [low, high]


def _paired(scores: dict, name: str) -> list[float] | None:
    """[difference, ci_low, ci_high, better, worse] of the candidate vs its base, example by example."""
    keys = (f"{name}_vs_base", f"{name}_vs_base_ci_low", f"{name}_vs_base_ci_high", f"{name}_better",
            f"{name}_worse")
    return [scores[k] for k in keys] if all(k in scores for k in keys) else None


def _holder(model_name: str, alias: str) -> str | None:
    from kubetune import tracking

    mv = tracking.get_alias(model_name, alias)
    return str(mv.version) if mv else None
