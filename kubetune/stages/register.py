"""Stage `register`: a new MLflow model version, `challenger` always, `champion` when earned.

Never registers from a failed or unevaluated run: the evaluation report must exist, say
``evaluated: true`` and carry the primary metric; the model folder must hold its manifest.
The champion moves only when the candidate beat the champion evaluate compared it with (or
there was none), passes the forgetting gate, and the alias still points where evaluate saw
it (compare-and-set, so two runs finishing together leave exactly one champion).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.config import setting
from kubetune.errors import ConfigError, StageError
from kubetune.tracking import RunContext, maybe_stage


@dataclass
class RegisterConfig:
    model_name: str = setting("", "Registered model name in MLflow.")
    max_forgetting: float = setting(-1.0, "Refuse champion if general perplexity rose by more than this "
                                          "fraction (0.1 = 10%); negative = no gate.")

    def __post_init__(self):
        if not self.model_name:
            raise ConfigError("'model_name' is required")


@dataclass
class RegisterResult:
    version: str
    aliases: list[str]
    promoted: bool
    reason: str
    summary: dict


def _check_evaluated(report_path: Path, model_dir: Path) -> dict:
    if not report_path.exists():
        raise StageError(f"register: no evaluation report at {report_path}; refusing to register an "
                         "unevaluated model")
    report = json.loads(report_path.read_text())
    metric = report.get("primary_metric")
    if not report.get("evaluated") or metric not in report.get("candidate", {}):
        raise StageError(f"register: evaluation report {report_path} is incomplete (evaluated="
                         f"{report.get('evaluated')}, primary metric {metric!r}); refusing to register")
    if not (model_dir / "kubetune_method.json").exists():
        raise StageError(f"register: {model_dir} is not a complete trained model (no kubetune_method.json)")
    return report


def decide(report: dict, cfg: RegisterConfig) -> tuple[bool, str]:
    """Whether the candidate earns `champion`, and why (in words that go on the version)."""
    metric = report["primary_metric"]
    cand = report["candidate"][metric]
    if not report["beats_champion"]:
        champ = report["champion"][metric]
        return False, f"{metric} {cand:.4f} does not beat champion v{report['champion_version']} ({champ:.4f})" \
                      f" by the margin {report['min_improvement']}"
    forgetting = report.get("forgetting")
    if cfg.max_forgetting >= 0 and forgetting is not None and forgetting > cfg.max_forgetting:
        return False, f"forgetting {forgetting:+.1%} exceeds the gate {cfg.max_forgetting:.1%}"
    if report["champion"] is None:
        return True, f"no champion yet; {metric} {cand:.4f}"
    return True, f"{metric} {cand:.4f} beats champion v{report['champion_version']} " \
                 f"({report['champion'][metric]:.4f})"


def register(cfg: RegisterConfig, model_dir: str | Path, report_path: str | Path,
             ctx: RunContext | None = None) -> RegisterResult:
    """Register the trained model and move aliases as earned.

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
    metric = report["primary_metric"]
    ctx = ctx or RunContext(model_name=cfg.model_name, pipeline_run_id="manual")
    promote, reason = decide(report, cfg)
    with maybe_stage(ctx, "register", params=asdict(cfg)) as run:
        tracking.log_metrics({f"candidate_{k}": v for k, v in report["candidate"].items()
                              if isinstance(v, (int, float))})
        tags = {
            **tracking.lineage_tags(),
            "kubetune.pipeline_run_id": ctx.pipeline_run_id,
            "kubetune.pipeline": ctx.pipeline,
            "kubetune.base_model": manifest.get("base_model", ""),
            "kubetune.method": manifest.get("method", ""),
            "kubetune.data_fingerprint": manifest.get("data_fingerprint") or report.get("data_fingerprint", ""),
            "kubetune.eval_fingerprint": report.get("data_fingerprint", ""),
            "kubetune.primary_metric": metric,
            **{f"eval.{k}": v for k, v in report["candidate"].items() if isinstance(v, (int, float))},
            **({"eval.forgetting": report["forgetting"]} if report.get("forgetting") is not None else {}),
            **{f"base.{k}": v for k, v in report["base"].items()},
        }
        mv = tracking.create_version(cfg.model_name, model_dir, tags,
                                     description=f"{manifest.get('method')} on {manifest.get('base_model')}")
        version = str(mv.version)
        tracking.move_alias(cfg.model_name, tracking.CHALLENGER, version,
                            expected_current=_holder(cfg.model_name, tracking.CHALLENGER))
        aliases = [tracking.CHALLENGER]
        if promote:
            moved, why = tracking.move_alias(cfg.model_name, tracking.CHAMPION, version,
                                             expected_current=report.get("champion_version"))
            if moved:
                aliases.append(tracking.CHAMPION)
            else:
                promote, reason = False, f"not promoted: {why}"
        tracking.set_version_tags(cfg.model_name, version, {"kubetune.decision": "promoted" if promote else
                                                               "challenger", "kubetune.decision_reason": reason})
        tracking.set_tags({"kubetune.model_version": version, "kubetune.decision_reason": reason})
        summary = {
            "model_name": cfg.model_name, "version": version, "aliases": aliases, "promoted": promote,
            "reason": reason, "primary_metric": metric, "candidate": report["candidate"][metric],
            "base": report["base"].get(metric), "champion_before": (report["champion"] or {}).get(metric),
            "forgetting": report.get("forgetting"), "tracking_uri": tracking.tracking_uri(),
            "run_id": run.info.run_id if run is not None else None,
        }
    return RegisterResult(version=version, aliases=aliases, promoted=promote, reason=reason, summary=summary)


def _holder(model_name: str, alias: str) -> str | None:
    from kubetune import tracking

    mv = tracking.get_alias(model_name, alias)
    return str(mv.version) if mv else None
