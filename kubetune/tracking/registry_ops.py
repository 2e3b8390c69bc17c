"""What MLOps teams do with the registry: gates, model cards, promote, rollback, skip-unchanged.

The promotion gates are one pure function (``check_gates``) used by the ``register`` stage and
by ``kubetune promote``, so a version promoted by hand passes the same tests as one promoted by
a pipeline (unless ``--force``, which is recorded on the version). Every MLflow call goes
through ``kubetune.tracking`` (the one place kubetune's MLflow code lives); this module only decides and formats.

Version tags written by ``register`` (the numbers behind every decision):

    eval.<metric>            candidate's metrics        base.<metric>      base model's
    champion.<metric>        the champion compared with kubetune.champion_compared (its version)
    eval.forgetting          general-perplexity rise vs base
    gate.min_improvement / gate.max_forgetting / gate.require_complete / gate.beyond_noise   the gates
    gate.<check>             "pass: ..." or "fail: ..." for each check
    kubetune.decision        promoted | challenger | forced       kubetune.decision_reason
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.lib.report import EvalReport, better, lower_is_better


@dataclass
class Gates:
    """The promotion gates of one run (from register's settings)."""

    min_improvement: float = 0.0
    max_forgetting: float = -1.0
    require_complete: bool = True
    not_worse_than_base: bool = True
    beyond_noise: bool = False


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: dict[str, str] = field(default_factory=dict)

    def tags(self, gates: Gates) -> dict[str, str]:
        return {"gate.min_improvement": str(gates.min_improvement), "gate.max_forgetting": str(gates.max_forgetting),
                "gate.require_complete": str(gates.require_complete),
                "gate.not_worse_than_base": str(gates.not_worse_than_base),
                "gate.beyond_noise": str(gates.beyond_noise),
                **{f"gate.{k}": v for k, v in self.checks.items()}}


def _noise_margin(candidate: dict, champion: dict, metric: str) -> float | str:
    """The margin a difference of two scores must exceed to be more than noise, or why it is unknown.

    sqrt(h1² + h2²) for 95% half-widths h1, h2: the 95% half-width of the difference of two
    independent scores. The scores share their validation rows, so this is conservative.
    """
    from kubetune.lib.stats import half_width

    h_cand, h_champ = half_width(candidate, metric), half_width(champion, metric)
    if h_cand is None or h_champ is None:
        who = "candidate" if h_cand is None else "champion"
        return f"beyond_noise is on but the {who} has no interval for {metric}"
    return (h_cand ** 2 + h_champ ** 2) ** 0.5


def check_gates(report: EvalReport, gates: Gates) -> Decision:
    """Decide whether a candidate earns `champion`; every check is named and explained.

    Checks, in order (the first failure is the reason):
      complete:    evaluated, the primary metric present for candidate, base and champion,
                   forgetting measured when its gate is on (only when ``require_complete``);
      champion:    beats the champion on ``metric`` by ``min_improvement`` (passes when none);
                   with ``beyond_noise``, by more than the noise of both scores' intervals too;
      base:        not worse than the base model on ``metric``, and strictly better for a first
                   version (no champion yet), so a first run that made things worse, or changed
                   nothing, never becomes champion; a Mixture-of-Agents (its base is its best
                   single proposer, named in ``base_name``) trains nothing that could have failed
                   to learn, so it must only not be worse;
      forgetting:  general-perplexity rise at most ``max_forgetting`` (off when negative);
      benchmarks:  evaluate's verdict on the lm-eval benchmarks (``kubetune.lib.benchmarks.gate``), when run.

    Args:
        report: The evaluation (``eval.json``, or a version's recorded ``eval.*`` tags).
        gates: The gates in force.
    """
    metric, candidate, base, champion = report.primary_metric, report.candidate, report.base, report.champion
    champion_version, forgetting, benchmarks = report.champion_version, report.forgetting, report.benchmark_gate
    first_beats_base = not report.base_name
    checks: dict[str, str] = {}
    missing = []
    if not report.evaluated:
        missing.append("evaluation not marked evaluated")
    if metric not in candidate:
        missing.append(f"candidate has no {metric}")
    if base is not None and metric not in base:
        missing.append(f"base has no {metric}")
    if champion_version is not None and (champion is None or metric not in champion):
        missing.append(f"champion v{champion_version} has no {metric}")
    if gates.max_forgetting >= 0 and forgetting is None:
        missing.append("forgetting gate set but forgetting not measured")
    if missing and gates.require_complete:
        checks["complete"] = "fail: " + "; ".join(missing)
    else:
        checks["complete"] = "pass" if not missing else "skipped (require_complete off): " + "; ".join(missing)

    cand = candidate.get(metric)
    if champion_version is None:
        checks["champion"] = "pass: no champion yet"
    elif cand is None or champion is None or metric not in champion:
        checks["champion"] = "fail: no numbers to compare"
    else:
        champ = champion[metric]
        margin = gates.min_improvement
        noise = _noise_margin(candidate, champion, metric) if gates.beyond_noise else 0.0
        if isinstance(noise, str):
            checks["champion"] = f"fail: {noise}"
        else:
            margin = max(margin, noise)
            word = "beats" if better(cand, champ, metric, margin) else "does not beat"
            checks["champion"] = (f"{'pass' if word == 'beats' else 'fail'}: {metric} {cand:.4f} {word} champion "
                                  f"v{champion_version} ({champ:.4f}) by the margin {round(margin, 4)}"
                                  + (" (the noise of both scores' intervals)" if gates.beyond_noise else ""))

    if not gates.not_worse_than_base:
        checks["base"] = "pass: gate off"
    elif cand is None or not base or metric not in base:
        checks["base"] = "pass: no base numbers"
    elif better(base[metric], cand, metric, 0.0):
        checks["base"] = f"fail: {metric} {cand:.4f} is worse than the base model's ({base[metric]:.4f})"
    elif first_beats_base and champion_version is None and not better(cand, base[metric], metric, 0.0):
        # A first version has no champion to beat; tying the base means it learned nothing
        # measurable (e.g. one step spent in learning-rate warm-up), so it must beat the base.
        checks["base"] = (f"fail: {metric} {cand:.4f} does not beat the base model's ({base[metric]:.4f}); "
                          "a first version must")
    else:
        checks["base"] = f"pass: {metric} {cand:.4f} not worse than the base model's ({base[metric]:.4f})"

    if gates.max_forgetting < 0:
        checks["forgetting"] = "pass: gate off"
    elif forgetting is None:
        checks["forgetting"] = "fail: not measured"
    elif forgetting > gates.max_forgetting:
        checks["forgetting"] = f"fail: forgetting {forgetting:+.1%} exceeds the gate {gates.max_forgetting:.1%}"
    else:
        checks["forgetting"] = f"pass: forgetting {forgetting:+.1%} within {gates.max_forgetting:.1%}"

    if benchmarks:
        checks["benchmarks"] = benchmarks

    failed = [v for k, v in checks.items() if v.startswith("fail")]
    if failed:
        return Decision(False, failed[0][len("fail: "):], checks)
    if champion_version is None:
        return Decision(True, f"no champion yet; {metric} {cand:.4f}", checks)
    return Decision(True, checks["champion"][len("pass: "):], checks)


def numbers_from_tags(tags: dict[str, str], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in tags.items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix):]] = float(v)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------- model card


def model_card(model_name: str, version: str, manifest: dict, report: EvalReport, decision: Decision, gates: Gates,
               pipeline: str, pipeline_run_id: str, run_id: str | None) -> str:
    """The README of one model version: what it is, what it was trained on, how it scored."""
    metric = report.primary_metric
    cand, base, champ = report.candidate, report.base or {}, report.champion
    train = manifest.get("train") or {}
    keys = [k for k in ("exact_match", "field_accuracy", "rouge_l", "val_loss", "val_perplexity",
                        "general_perplexity") if k in cand] + sorted(k for k in cand if k.startswith("bench_"))

    def fmt(d, k):
        v = (d or {}).get(k)
        return "n/a" if v is None else f"{v:.4f}"

    def delta(d, k):
        v, c = (d or {}).get(k), cand.get(k)
        return "" if v is None or c is None else f"{c - v:+.4f}"

    champ_label = f"champion v{report.champion_version}" if report.champion_version else "champion"
    rows = "\n".join(f"| {k}{' (primary)' if k == metric else ''} | {fmt(cand, k)} | {fmt(base, k)} | "
                     f"{delta(base, k)} | {fmt(champ, k)} | {delta(champ, k)} |" for k in keys)
    hyper = {k: train[k] for k in ("method", "max_steps", "learning_rate", "lora_rank", "lora_alpha",
                                   "batch_size", "grad_accum", "max_length", "seed") if k in train}
    hyper_lines = "\n".join(f"  - `{k}`: {v}" for k, v in hyper.items()) or "  - (not recorded)"
    forgetting = report.forgetting
    size = (manifest.get("counts") or {}).get("train")
    checks = "\n".join(f"- {k}: {v}" for k, v in decision.checks.items())
    return f"""# {model_name} v{version}

{manifest.get('method', '?')} fine-tune of `{manifest.get('base_model', '?')}`.
Decision: **{'champion' if decision.promote else 'challenger'}**: {decision.reason}

## Intended use

Answers the task of its training data ({manifest.get('shape', 'unknown')} records) the way the
examples do. Not evaluated for safety or for other tasks; check the numbers below before serving,
and prefer the `champion` alias, which only moves through the promotion gates.

## Training

- base model: `{manifest.get('base_model', '?')}`
- method: `{manifest.get('method', '?')}`
- data fingerprint: `{manifest.get('data_fingerprint') or report.data_fingerprint or '?'}`
- data size: {size if size is not None else 'n/a'} training rows, {report.validation_examples} validation examples
- hyperparameters:
{hyper_lines}

## Evaluation (validation split, primary metric `{metric}`, {'lower' if lower_is_better(metric) else 'higher'} is better)

| metric | this version | base | vs base | {champ_label} | vs champion |
|---|---|---|---|---|---|
{rows}

Forgetting (general-text perplexity vs base): {'n/a' if forgetting is None else f'{forgetting:+.1%}'}

## Promotion gates

min_improvement {gates.min_improvement}, max_forgetting {gates.max_forgetting}, require_complete {gates.require_complete}
{checks}

## Lineage

- pipeline: `{pipeline}`, pipeline run `{pipeline_run_id}`
- MLflow run: `{run_id}`
"""


# ---------------------------------------------------------------- promote / rollback / list


@dataclass
class Outcome:
    moved: bool
    message: str
    version: str | None = None


def _gates_of(tags: dict[str, str]) -> Gates:
    return Gates(min_improvement=float(tags.get("gate.min_improvement", 0.0)),
                 max_forgetting=float(tags.get("gate.max_forgetting", -1.0)),
                 require_complete=tags.get("gate.require_complete", "True") == "True",
                 not_worse_than_base=tags.get("gate.not_worse_than_base", "True") == "True",
                 beyond_noise=tags.get("gate.beyond_noise", "False") == "True")


def _open_registry(what: str) -> None:
    """Point MLflow at the registry and make sure it answers, before any call that would retry for minutes.

    A command someone types waits ``KUBETUNE_MLFLOW_WAIT_S`` when it is set, else 10 s: long enough
    for a server that is restarting, short enough to say at once that it is down (a pipeline
    stage waits 300 s by default, since nobody is there to rerun it).
    """
    import os

    from kubetune import tracking

    tracking.configure()
    tracking.wait_for_server(what, float(os.environ.get("KUBETUNE_MLFLOW_WAIT_S", "10")), quiet=True)


def _version_of(model_name: str, version: str):
    """The registered version, or an error that names what is missing and how to see what exists."""
    import shlex

    from mlflow.exceptions import MlflowException

    from kubetune import tracking
    from kubetune.errors import KubetuneError

    try:
        return tracking.get_version(model_name, version)
    except MlflowException as e:
        if any(tracking.has_error_code(e, code) for code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")):
            raise KubetuneError(f"model {model_name!r} has no version {version!r}; `kubetune models "
                                f"{shlex.quote(model_name)}` lists its versions") from None
        raise


def promote(model_name: str, version: str, force: bool = False) -> Outcome:
    """Make ``version`` the champion by hand, through the gates it was registered with.

    The candidate's and champion's numbers are the ones recorded on the versions; they are only
    comparable when both were evaluated on the same validation data (``kubetune.eval_fingerprint``),
    otherwise the promotion is refused unless forced. ``force`` skips the gates and says so on
    the version (``kubetune.decision = forced``).
    """
    from kubetune import tracking

    _open_registry("kubetune promote")
    version = str(version)
    mv = _version_of(model_name, version)
    tags = dict(mv.tags)
    holder = tracking.get_alias(model_name, tracking.CHAMPION)
    holder_v = str(holder.version) if holder else None
    if holder_v == version:
        return Outcome(False, f"version {version} is already the champion", version)
    metric = tags.get("kubetune.primary_metric", "")
    if force:
        decision = Decision(True, f"forced by hand over champion v{holder_v}", {"forced": "pass: --force"})
    else:
        champ_tags = dict(holder.tags) if holder else {}
        if holder and champ_tags.get("kubetune.eval_fingerprint") != tags.get("kubetune.eval_fingerprint"):
            return Outcome(False, f"refused: v{version} and champion v{holder_v} were evaluated on different "
                                  "validation data; their numbers do not compare (use --force)", version)
        recorded = EvalReport(primary_metric=metric, candidate=numbers_from_tags(tags, "eval."),
                              base=numbers_from_tags(tags, "base."),
                              champion=numbers_from_tags(champ_tags, "eval.") if holder else None,
                              champion_version=holder_v,
                              forgetting=float(tags["eval.forgetting"]) if "eval.forgetting" in tags else None,
                              evaluated="kubetune.decision" in tags)
        decision = check_gates(recorded, _gates_of(tags))
        if not decision.promote:
            return Outcome(False, f"refused: {decision.reason}", version)
    moved, why = tracking.move_alias(model_name, tracking.CHAMPION, version, expected_current=holder_v,
                                     note=f"promote{' --force' if force else ''}: {decision.reason}")
    if not moved:
        return Outcome(False, f"not promoted: {why}", version)
    tracking.set_version_tags(model_name, version, {
        "kubetune.decision": "forced" if force else "promoted", "kubetune.decision_reason": decision.reason,
        "kubetune.promoted_by": "kubetune promote --force" if force else "kubetune promote",
        **{f"gate.{k}": v for k, v in decision.checks.items()}})
    return Outcome(True, f"champion: v{holder_v} -> v{version} ({decision.reason})", version)


def rollback(model_name: str) -> Outcome:
    """Champion back to the version that held it before, from the recorded alias history."""
    from kubetune import tracking

    _open_registry("kubetune rollback")
    with tracking.alias_lock(model_name, tracking.CHAMPION):
        holder = tracking.get_alias(model_name, tracking.CHAMPION)
        history = tracking.alias_history(model_name, tracking.CHAMPION)
        if holder is None:
            return Outcome(False, f"{model_name} has no champion to roll back")
        current = str(holder.version)
        # The history ends with the current holder; drop it (and any repeats of it) to find the one before.
        while history and history[-1] == current:
            history.pop()
        if not history:
            return Outcome(False, f"no earlier champion recorded for {model_name} (champion is v{current})")
        previous = history[-1]
        tracking.set_alias(model_name, tracking.CHAMPION, previous, note=f"rollback from v{current}",
                           history=history)
        tracking.set_version_tags(model_name, current, {"kubetune.rolled_back": f"champion returned to v{previous}"})
    return Outcome(True, f"champion: v{current} -> v{previous} (rollback)", previous)


def models_table(model_name: str) -> str:
    """Versions with aliases, primary metric, forgetting, decision and lineage, as a text table."""
    from kubetune import tracking
    from kubetune.errors import KubetuneError

    _open_registry("kubetune models")
    versions = tracking.list_versions(model_name)
    if not versions:
        raise KubetuneError(f"no registered model {model_name!r} with versions; check the name (the MLflow UI "
                            f"lists registered models at {tracking.tracking_uri()})")
    history = tracking.alias_history(model_name, tracking.CHAMPION)
    aliases = tracking.version_aliases(model_name)
    # One column per benchmark any version was scored on (the candidate's score; "-" where not run).
    benches = sorted({k[len("eval."):] for mv in versions for k in mv.tags if k.startswith("eval.bench_")})
    header = ["version", "aliases", "metric", "value", "base", "forgetting",
              *(b[len("bench_"):] for b in benches), "decision", "deployed", "data", "method", "pipeline run",
              "mlflow run"]
    rows = []
    for mv in versions:
        t = mv.tags
        metric = t.get("kubetune.primary_metric", "")
        decision = t.get("kubetune.decision", "")
        if t.get("kubetune.skipped"):
            decision = "skipped"
        rows.append([
            f"v{mv.version}", ",".join(aliases.get(str(mv.version), [])) or "-", metric,
            _num(t.get(f"eval.{metric}")), _num(t.get(f"base.{metric}")),
            _pct(t.get("eval.forgetting")), *(_num(t.get(f"eval.{b}")) for b in benches),
            decision + (" (rolled back)" if t.get("kubetune.rolled_back") else ""),
            _deployed(t.get("kubetune.deploy", "")), t.get("kubetune.data_fingerprint", "")[:8],
            t.get("kubetune.method", ""),
            t.get("kubetune.pipeline_run_id", "")[:12], (mv.run_id or "")[:8]])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.append("")
    lines.append(f"champion history (oldest first): {' -> '.join('v' + v for v in history) or '-'}")
    reasons = [f"  v{mv.version}: {mv.tags['kubetune.decision_reason']}" for mv in versions
               if mv.tags.get("kubetune.decision_reason")]
    if reasons:
        lines += ["decisions:", *reasons]
    return "\n".join(lines)


def _deployed(tag: str) -> str:
    """The deploy tag in a word: where it serves, or that its smoke test failed."""
    if not tag:
        return "-"
    return "failed" if tag.startswith("failed") else tag.split(":", 1)[0]


def _num(v: Any) -> str:
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return "-"


def _pct(v: Any) -> str:
    try:
        return f"{float(v):+.1%}"
    except (TypeError, ValueError):
        return "-"


# ---------------------------------------------------------------- skip when nothing changed


RUN_KEY_TAG = "kubetune.run_key"


def unchanged(model_name: str, run_key: str, force: bool = False) -> tuple[bool, str]:
    """Whether the current champion was made by exactly this run (then retraining is skipped).

    The run key (``kubetune.lib.run_keys.run_key``) covers the data and its split, the base model,
    the method and every training setting, and the kubetune code: a champion trained with LoRA
    does not make a DoRA run on the same data redundant.

    Returns:
        (unchanged, reason). Never unchanged when forced, or with no champion.
    """
    from kubetune import tracking

    if force:
        return False, "forced: retraining regardless"
    tracking.configure()
    holder = tracking.get_alias(model_name, tracking.CHAMPION)
    if holder is None:
        return False, "no champion yet"
    made_by = holder.tags.get(RUN_KEY_TAG, "")
    if made_by == run_key:
        return True, (f"skipped: nothing changed (data, split, base model, settings and code = champion "
                      f"v{holder.version}'s; run key {run_key})")
    return False, f"changed: run key {run_key} (champion v{holder.version} was made by {made_by or 'unknown'})"


def skip_decision(model_name: str, fingerprint: str, training: str, force: bool, ctx) -> tuple[bool, str]:
    """``ingest``'s question: does this pipeline run need to train? Records the run key on the
    pipeline's parent run, where ``register`` (or ``register_skipped``) reads it."""
    from kubetune import tracking
    from kubetune.lib.run_keys import run_key

    key = run_key(fingerprint, training)
    tracking.tag_pipeline_run(ctx, {RUN_KEY_TAG: key})
    return unchanged(model_name, key, force)


def skipped_summary(model_name: str, fingerprint: str, ctx) -> dict:
    """Record a skipped pipeline run (a `register` child run tagged skipped, no version) and summarise it."""
    from kubetune import tracking

    key = tracking.pipeline_run_tags(ctx).get(RUN_KEY_TAG, "")
    _, reason = unchanged(model_name, key)
    holder = tracking.get_alias(model_name, tracking.CHAMPION)
    tags = {"kubetune.skipped": "true", "kubetune.skip_reason": reason}
    with tracking.maybe_stage(ctx, "register", tags=tags) as run:
        tracking.set_tags({"kubetune.decision_reason": reason})
        run_id = run.info.run_id
    tracking.tag_pipeline_run(ctx, {**tags, "kubetune.status": "skipped"})
    metric = holder.tags.get("kubetune.primary_metric") if holder else None
    return {"model_name": model_name, "skipped": True, "version": str(holder.version) if holder else None,
            "aliases": sorted(holder.aliases) if holder else [], "promoted": False, "reason": reason,
            "primary_metric": metric, "candidate": None, "data_fingerprint": fingerprint,
            "champion_before": float(holder.tags[f"eval.{metric}"]) if holder and f"eval.{metric}" in holder.tags
            else None, "base": None, "forgetting": None, "tracking_uri": tracking.tracking_uri(), "run_id": run_id}


__all__ = ["Gates", "Decision", "check_gates", "model_card", "promote", "rollback", "models_table",
           "unchanged", "skip_decision", "skipped_summary"]
