"""`kubetune compare`: the method trade-offs as measured numbers.

Runs the method pipelines on the same data, base model and budget, collects every number from
MLflow (the runs the pipelines logged, not a side channel), and writes a report: Markdown, HTML
with the plots inline, and JSON, logged as artifacts of a ``compare`` run in MLflow.

Locally each method is one ``kfp.local`` run of its pipeline, one after the other (a failed
method is a row with its error; the others go on). On a cluster, ``pipelines/compare.py`` makes a
pipeline of pipelines: every method pipeline as a sub-DAG, then a report step that collects the
same way from the MLflow server.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.core.defaults import MAIN_JOB
from kubetune.core.peft_methods import METHODS as TRAIN_METHODS
from kubetune.errors import ConfigError
from kubetune.lib.report import EvalReport

# method -> (pipeline, fixed parameters). The PEFT family shares one pipeline.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    **{m: ("peft", {"method": m}) for m in TRAIN_METHODS if m != "full"},
    "moe": ("moe", {}),
    "moe-lora": ("moe", {"kind": "lora"}),
    "feature-extraction": ("feature-extraction", {}),
}
STEP_BUDGET_PIPELINES = {"full", "peft", "moe"}
DEFAULT_METHODS = "full,lora,dora,ia3,adapter,prompt,feature-extraction"


@dataclass
class Budget:
    """The same budget for every method: optimizer steps, optionally capped by training seconds."""

    steps: int = MAIN_JOB.max_steps
    seconds: float = 0.0  # 0 = no wall-clock cap

    @classmethod
    def parse(cls, text: str, steps: int = MAIN_JOB.max_steps) -> "Budget":
        """``steps:30`` or ``time:300`` (seconds of training per method; ``steps`` stays the schedule's
        horizon, so set it to what the fastest method would reach)."""
        kind, _, value = text.partition(":")
        try:
            if kind == "steps":
                return cls(steps=int(value))
            if kind == "time":
                return cls(steps=steps, seconds=float(value))
        except ValueError:
            pass
        raise ConfigError(f"--budget: expected 'steps:N' or 'time:SECONDS', got '{text}'")

    def describe(self) -> str:
        return f"{self.steps} steps" + (f", at most {self.seconds:.0f} s of training" if self.seconds else "")


@dataclass
class Row:
    """One method's numbers, all read back from MLflow."""

    method: str
    pipeline: str
    status: str = "ok"
    error: str = ""
    metric_name: str = ""
    base: float | None = None
    tuned: float | None = None
    forgetting: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    peak_mem_gb: float | None = None
    train_wall_s: float | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    model_name: str = ""
    version: str = ""
    pipeline_run_id: str = ""
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    n: int | None = None  # validation examples behind ``tuned``
    tuned_ci: tuple[float, float] | None = None  # its 95% interval (one run)
    forgetting_ci: tuple[float, float] | None = None
    seed: int = 0
    runs: list[float] = field(default_factory=list)  # ``tuned`` of each seed when a row sums up several
    tuned_sd: float | None = None  # their sample standard deviation

    @property
    def gain(self) -> float | None:
        return None if self.base is None or self.tuned is None else self.tuned - self.base


def default_label_field(data_uri: str, label_field: str = "") -> str:
    """The JSON answer key feature-extraction classifies by: as given, or ``issue`` for the bundled tickets."""
    return label_field or ("issue" if data_uri == "bundled://tickets" else "")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown method(s) {unknown or '(none)'}; known: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: a method is listed twice: {methods}")
    return methods


def peft_learning_rate(method: str) -> float:
    """The learning rate a PEFT method gets in a comparison.

    The main job's rate (``MAIN_JOB.learning_rate``, 1e-3, a short-run rate for the LoRA family) for LoRA, DoRA and
    adapters; IA3 and the virtual-token methods keep their own, higher defaults
    (``kubetune.core.peft_methods``: 3e-3, 3e-2, 3e-2). A shared 1e-3 left prompt tuning at 0% exact
    match in the first comparison: too low by an order of magnitude for it, not a weak method.
    """
    from kubetune.core.peft_methods import default_learning_rate

    return max(MAIN_JOB.learning_rate, default_learning_rate(method))


def method_params(method: str, *, data_uri: str, base_model: str, budget: Budget, prefix: str,
                  eval_settings: dict, batch_size: int, max_length: int, classification_uri: str = "",
                  seed: int = 0) -> dict:
    """The pipeline parameters of one method under the shared budget (``seed``: the training seed)."""
    pipeline, fixed = METHODS[method]
    params: dict[str, Any] = {**fixed, "base_model": base_model, "model_name": f"{prefix}-{method}", "force": True}
    if pipeline in STEP_BUDGET_PIPELINES:
        train = {"batch_size": batch_size, **({"seed": seed} if seed else {})}
        if budget.seconds:
            train["max_train_seconds"] = budget.seconds
        params.update(data_uri=data_uri, max_steps=budget.steps, max_length=max_length, train_settings=train,
                      eval_settings=dict(eval_settings))
        if pipeline == "peft":
            params["learning_rate"] = peft_learning_rate(method)
    elif pipeline == "feature-extraction":
        # The head trains to convergence in seconds: the budget does not apply.
        params.update(data_uri=classification_uri or data_uri)
    return params


def classification_view(data_uri: str, label_field: str, out_dir: Path) -> str:
    """The same records as text -> label, for feature extraction (a head needs classes).

    Classification data is used as it is. For instruction data whose answers are JSON objects,
    ``label_field`` names the key that becomes the class (for the bundled tickets, ``issue``).
    """
    from kubetune.errors import DataError
    from kubetune.lib.dataset import atomic_file, write_jsonl
    from kubetune.stages.ingest import IngestConfig, check

    result = check(IngestConfig(data_uri=data_uri))
    if result.shape == "classification":
        return data_uri
    if not label_field:
        raise ConfigError(f"feature-extraction on '{data_uri}' (shape '{result.shape}') needs --label-field: "
                          "the key of the JSON answers that becomes the class")
    rows = []
    for i, r in enumerate(result.train + result.validation):
        try:
            label = json.loads(r.get("output", ""))[label_field]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{data_uri}: record {i + 1}: field 'output' is not a JSON object with key "
                            f"'{label_field}' (--label-field)") from None
        text = (r.get("input") or r.get("instruction") or "").strip()
        rows.append({"text": text, "label": str(label)})
    path = out_dir / f"classification-{label_field}.jsonl"
    with atomic_file(path) as tmp_path:
        write_jsonl(tmp_path, rows)
    return str(path)


# ---------------------------------------------------------------- collecting from MLflow


def collect(method: str, model_name: str, pipeline_run_id: str | None = None) -> Row:
    """One method's row from the runs its pipeline logged (the newest pipeline run when no id)."""
    from mlflow.tracking import MlflowClient

    from kubetune import tracking

    pipeline = METHODS[method][0]
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.experiment_name(model_name))
    row = Row(method=method, pipeline=pipeline, model_name=model_name)
    if exp is None:
        return _failed(row, f"no MLflow experiment for {model_name}")
    if not pipeline_run_id:
        parents = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_STAGE}` = 'pipeline'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            return _failed(row, f"no pipeline run logged for {model_name}")
        pipeline_run_id = parents[0].data.tags[tracking.TAG_PIPELINE_RUN]
    row.pipeline_run_id = pipeline_run_id
    runs = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{pipeline_run_id}'")
    stages = {r.data.tags.get(tracking.TAG_STAGE, ""): r for r in runs}
    train = next((r for s, r in stages.items() if s.startswith("train")), None)
    evaluation = next((r for s, r in stages.items() if s.startswith("evaluate")), None)
    register = stages.get("register")
    if train is None or evaluation is None or register is None:
        return _failed(row, f"the pipeline run logged stages {sorted(stages)}; train, evaluate and register "
                            "are all needed")
    report = _report(evaluation)
    row.metric_name = report.primary_metric
    row.tuned = _num(report.candidate.get(row.metric_name))
    row.base = _num((report.base or {}).get(row.metric_name))
    row.forgetting = _num(report.forgetting)
    em = evaluation.data.metrics
    row.n = _int(em.get("candidate_n"))
    row.tuned_ci = _pair(em.get(f"candidate_{row.metric_name}_ci_low"), em.get(f"candidate_{row.metric_name}_ci_high"))
    row.forgetting_ci = _pair(em.get("forgetting_ci_low"), em.get("forgetting_ci_high"))
    m = train.data.metrics
    row.trainable_params = _int(m.get("trainable_params"))
    row.total_params = _int(m.get("total_params"))
    row.peak_mem_gb = max((r.data.metrics["peak_memory_gb"] for r in runs if "peak_memory_gb" in r.data.metrics),
                          default=None)
    row.train_wall_s = _num(m.get("train_wall_s"))
    row.tokens_per_s = _num(m.get("tokens_per_s"))
    row.steps = _int(m.get("steps"))
    starts = [r.info.start_time for r in runs if r.info.start_time]
    ends = [r.info.end_time for r in runs if r.info.end_time]
    row.wall_s = (max(ends) - min(starts)) / 1000 if starts and ends else None
    row.version = register.data.tags.get("kubetune.model_version", "")
    row.loss_curve = [(h.step, h.value) for h in client.get_metric_history(train.info.run_id, "loss")]
    return row


def _report(evaluation) -> EvalReport:
    """evaluate's numbers, as its run logged them (``EvalReport.log``), with the primary metric's name."""
    m = evaluation.data.metrics
    metric = evaluation.data.tags.get("kubetune.primary_metric") or evaluation.data.params.get("primary_metric", "auto")
    report = EvalReport.from_logged(m, metric)
    if metric == "auto" or metric not in report.candidate:
        report.primary_metric = next((k for k in ("exact_match", "macro_f1", "accuracy", "val_loss")
                                      if k in report.candidate), "")
    return report


def _failed(row: Row, why: str) -> Row:
    row.status, row.error = "failed", why
    return row


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _int(v) -> int | None:
    return None if v is None else int(v)


def _pair(low, high) -> tuple[float, float] | None:
    low, high = _num(low), _num(high)
    return None if low is None or high is None else (low, high)


def summarise(runs: list[Row]) -> Row:
    """One row for several seeds of a method: the mean of every number, ``tuned`` ± its spread.

    The spread (sample standard deviation over seeds) is the run-to-run noise of training; each
    run's own interval is the noise of its n validation examples. Both matter: the first is what
    another seed would give on the same rows, the second what other rows would give.
    """
    ok = [r for r in runs if r.status == "ok"]
    if len(runs) == 1 or not ok:
        return runs[0]
    from kubetune.lib.stats import spread

    out = Row(**{k: getattr(ok[0], k) for k in ("method", "pipeline", "metric_name", "model_name", "n",
                                                "trainable_params", "total_params")})
    for name in ("base", "tuned", "forgetting", "peak_mem_gb", "train_wall_s", "wall_s", "tokens_per_s"):
        values = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        setattr(out, name, sum(values) / len(values) if values else None)
    out.steps = ok[0].steps
    out.runs = [r.tuned for r in ok if r.tuned is not None]
    if out.runs:
        out.tuned_sd = spread(out.runs)[1]
    out.loss_curve = ok[0].loss_curve
    out.version = ",".join(r.version for r in ok if r.version)
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        out.error = f"{len(failed)} of {len(runs)} runs failed: {failed[0].error}"
    return out


# ---------------------------------------------------------------- the report


def _fmt(v, kind: str = "f") -> str:
    if v is None:
        return "–"
    if kind == "pct":
        return f"{v:+.1%}"
    if kind == "int":
        return f"{v:,}"
    if kind == "params":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"


COLUMNS = ["method", "metric", "n", "base", "tuned", "gain", "forgetting", "trainable", "share", "peak mem (GB)",
           "train s", "wall s", "tokens/s", "steps", "version"]


def _tuned_cell(r: Row) -> str:
    """``0.708 [0.57, 0.82]`` for one run (95% interval); ``0.700 ± 0.012 (2 seeds: 0.71, 0.69)`` for several."""
    if r.tuned is None:
        return "–"
    if len(r.runs) > 1:
        return (f"{r.tuned:.3f} ± {r.tuned_sd:.3f} ({len(r.runs)} seeds: "
                + ", ".join(f"{v:.3f}" for v in r.runs) + ")")
    return _fmt(r.tuned) + (f" [{r.tuned_ci[0]:.3f}, {r.tuned_ci[1]:.3f}]" if r.tuned_ci else "")


def _forgetting_cell(r: Row) -> str:
    text = _fmt(r.forgetting, "pct")
    if r.forgetting_ci and not r.runs:
        text += f" [{r.forgetting_ci[0]:+.1%}, {r.forgetting_ci[1]:+.1%}]"
    return text


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.status != "ok":
            out.append([r.method, f"failed: {r.error}"] + [""] * (len(COLUMNS) - 2))
            continue
        share = r.trainable_params / r.total_params if r.trainable_params and r.total_params else None
        out.append([r.method, r.metric_name, _fmt(r.n, "int"), _fmt(r.base), _tuned_cell(r), _fmt(r.gain),
                    _forgetting_cell(r),
                    _fmt(r.trainable_params, "params"), f"{share:.3%}" if share is not None else "–",
                    _fmt(r.peak_mem_gb), _fmt(r.train_wall_s), _fmt(r.wall_s), _fmt(r.tokens_per_s),
                    _fmt(r.steps, "int"), r.version or "–"])
    return out


def plots(rows: list[Row]) -> dict[str, Any]:
    """quality vs trainable parameters, quality vs memory, loss curves overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok" and r.tuned is not None]
    figs = {}
    for name, attr, xlabel, log in (("quality_vs_params", "trainable_params", "trainable parameters", True),
                                    ("quality_vs_memory", "peak_mem_gb", "peak memory (GB; CPU: process RSS)",
                                     False)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in ok:
            x = getattr(r, attr)
            if x is None:
                continue
            ax.scatter([x], [r.tuned], s=40, marker="o" if r.metric_name == ok[0].metric_name else "s")
            ax.annotate(f"{r.method}", (x, r.tuned), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("task metric (tuned; squares: a different metric)")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figs[name] = fig
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in ok:
        if r.loss_curve and r.pipeline in STEP_BUDGET_PIPELINES:
            ax.plot([s for s, _ in r.loss_curve], [v for _, v in r.loss_curve], label=r.method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figs["loss_curves"] = fig
    return figs


def render(rows: list[Row], context: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write compare.md, compare.html (plots inline), compare.json and the plot PNGs to ``out_dir``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figs = plots(rows)
    pngs = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        (out_dir / f"{name}.png").write_bytes(buf.getvalue())
        pngs[name] = buf.getvalue()
    table = table_rows(rows)
    seeds = f", {context['seeds']} seeds per method" if context.get("seeds", 1) > 1 else ""
    header = [f"# kubetune compare: {context['data_uri']} on {context['base_model']}", "",
              f"Budget: {context['budget']}{seeds}; batch {context['batch_size']} rows of {context['max_length']} "
              f"tokens; evaluation {json.dumps(context['eval_settings'])}.",
              f"Machine: {context['machine']}. Each method is one run of its pipeline (kfp.local); the numbers are "
              "read back from MLflow.", ""]
    notes = ["", "- *gain*: tuned − base on the method's own primary metric; *forgetting*: relative change of "
             "perplexity on the bundled general text vs the base model (lower is better).",
             "- *n*: validation examples behind *tuned*. One run: [95% interval] (Wilson for exact match, t for "
             "means; forgetting: paired bootstrap over the general-text lines). Several seeds: mean ± sample "
             "standard deviation over the seeds (training noise), on the same validation rows; the other "
             "columns are means.",
             "- *peak mem*: on a GPU, torch's peak allocation; on CPU, the peak RSS of the training process "
             "(the interpreter and libraries included).",
             "- feature-extraction trains a head on frozen embeddings of the same records with the answer's "
             f"`{context.get('label_field') or 'label'}` as the class: its metric is macro-F1, not exact match."]
    md = header + ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table]
    md += notes + [""] + [f"![{n}]({n}.png)" for n in pngs] + [""]
    paths = {"md": out_dir / "compare.md", "html": out_dir / "compare.html", "json": out_dir / "compare.json"}
    paths["md"].write_text("\n".join(md))
    esc = _html_escape
    html = ["<!doctype html><meta charset='utf-8'><title>kubetune compare</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
            f"<h1>{esc(header[0][2:])}</h1>"] + [f"<p>{esc(line)}</p>" for line in header[2:4]]
    html += ["<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>"]
    html += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table]
    html += ["</table><ul>"] + [f"<li>{esc(n[2:])}</li>" for n in notes[1:]] + ["</ul>"]
    html += [f"<h2>{esc(n.replace('_', ' '))}</h2><img alt='{n}' src='data:image/png;base64,"
             f"{base64.b64encode(b).decode()}'>" for n, b in pngs.items()]
    paths["html"].write_text("\n".join(html))
    paths["json"].write_text(json.dumps({"context": context, "rows": [_row_json(r) for r in rows]}, indent=2))
    return paths


def _row_json(r: Row) -> dict:
    d = asdict(r)
    d["gain"] = r.gain
    d["peak_mem_bytes"] = int(r.peak_mem_gb * 2**30) if r.peak_mem_gb is not None else None
    return d


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def log_report(paths: dict[str, Path], rows: list[Row], context: dict) -> str:
    """The report as artifacts (and the plots as figures) of a ``compare`` run in MLflow; its run id."""
    import mlflow

    from kubetune import tracking

    tracking.configure()
    mlflow.set_experiment(tracking.experiment_name(context["prefix"]))
    with mlflow.start_run(run_name="compare", tags={tracking.TAG_STAGE: "compare"}) as run:
        tracking.log_params({"methods": ",".join(r.method for r in rows), "data_uri": context["data_uri"],
                             "base_model": context["base_model"], "budget": context["budget"]})
        for r in rows:
            if r.status == "ok" and r.tuned is not None:
                tracking.log_metrics({f"{r.method}.tuned": r.tuned, f"{r.method}.gain": r.gain or 0.0})
        for p in paths.values():
            mlflow.log_artifact(str(p))
        for png in sorted(paths["md"].parent.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")
        return run.info.run_id


# ---------------------------------------------------------------- running


@dataclass
class CompareConfig:
    data_uri: str = MAIN_JOB.data_uri
    methods: list[str] = field(default_factory=lambda: parse_methods(DEFAULT_METHODS))
    base_model: str = ""
    budget: Budget = field(default_factory=Budget)
    batch_size: int = MAIN_JOB.batch_size
    max_length: int = MAIN_JOB.max_length
    eval_settings: dict = field(default_factory=MAIN_JOB.eval_settings)
    label_field: str = ""
    prefix: str = "compare"
    out_dir: str = "compare-report"
    seeds: int = 1  # training runs per method (seeds 0..N-1) on the same split; the report shows mean ± spread


def run_compare(cfg: CompareConfig, workdir: str | Path | None = None, echo=print) -> tuple[list[Row], dict]:
    """Run every method's pipeline locally, one after the other, then write and log the report."""
    from kubetune.core.models import DEFAULT_BASE_MODEL

    base_model = cfg.base_model or DEFAULT_BASE_MODEL
    label_field = default_label_field(cfg.data_uri, cfg.label_field)
    workdir = Path(workdir or Path.cwd()).resolve()
    classification_uri = ""
    if "feature-extraction" in cfg.methods:
        classification_uri = classification_view(cfg.data_uri, label_field, workdir / ".kubetune" / "compare-data")
    rows: list[Row] = []
    for i, method in enumerate(cfg.methods, 1):
        pipeline = METHODS[method][0]
        # The head of feature extraction trains deterministically to convergence: one run says it all.
        seeds = range(cfg.seeds if pipeline in STEP_BUDGET_PIPELINES else 1)
        runs = []
        for seed in seeds:
            params = method_params(method, data_uri=cfg.data_uri, base_model=base_model, budget=cfg.budget,
                                   prefix=cfg.prefix, eval_settings=cfg.eval_settings, batch_size=cfg.batch_size,
                                   max_length=cfg.max_length, classification_uri=classification_uri, seed=seed)
            echo(f"== compare [{i}/{len(cfg.methods)}] {method}" + (f" seed {seed}" if len(seeds) > 1 else "")
                 + f": kubetune run {pipeline} "
                 + " ".join(f"--set {k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in params.items()))
            runs.append(_run_one(method, pipeline, params, workdir, echo))
            runs[-1].seed = seed
        rows.append(summarise(runs))
    return finish(rows, cfg, base_model, label_field)


def _run_one(method: str, pipeline: str, params: dict, workdir: Path, echo) -> Row:
    from kubetune.ops.runner import format_summary, run_local

    t0 = time.time()
    try:
        summary = run_local(pipeline, params, workdir)
    except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' rows
        row = _failed(Row(method=method, pipeline=pipeline, model_name=params["model_name"],
                          wall_s=round(time.time() - t0, 1)), str(e).splitlines()[0][:300])
        echo(f"   {method} failed: {row.error}")
        return row
    echo(format_summary(summary))
    row = safe_collect(method, params["model_name"], summary)
    row.wall_s = summary.get("wall_s", row.wall_s)  # the whole pipeline, as the user waited for it
    return row


def report_only(cfg: CompareConfig) -> tuple[list[Row], dict]:
    """The report from the newest pipeline run of each PREFIX-METHOD model already in MLflow (no training)."""
    from kubetune.core.models import DEFAULT_BASE_MODEL

    rows = [safe_collect(m, f"{cfg.prefix}-{m}") for m in cfg.methods]
    label_field = default_label_field(cfg.data_uri, cfg.label_field)
    return finish(rows, cfg, cfg.base_model or DEFAULT_BASE_MODEL, label_field)


def safe_collect(method: str, model_name: str, summary: dict | None = None) -> Row:
    """collect(), with a failure to read MLflow back reported in the row (the others' rows survive)."""
    try:
        return collect(method, model_name, _pipeline_run_id(summary) if summary else None)
    except Exception as e:  # noqa: BLE001 - a report with one bad row beats no report
        return _failed(Row(method=method, pipeline=METHODS[method][0], model_name=model_name),
                       f"reading MLflow back: {type(e).__name__}: {e}"[:300])


def finish(rows: list[Row], cfg: CompareConfig, base_model: str, label_field: str) -> tuple[list[Row], dict]:
    """Write the report files and log them to MLflow."""
    import platform

    context = {"data_uri": cfg.data_uri, "base_model": base_model, "budget": cfg.budget.describe(), "seeds": cfg.seeds,
               "batch_size": cfg.batch_size, "max_length": cfg.max_length, "eval_settings": cfg.eval_settings,
               "label_field": label_field, "prefix": cfg.prefix,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores" + _gpu_note()}
    paths = render(rows, context, Path(cfg.out_dir))
    context["mlflow_run_id"] = log_report(paths, rows, context)
    context["paths"] = {k: str(v) for k, v in paths.items()}
    return rows, context


def _pipeline_run_id(summary: dict) -> str | None:
    from kubetune import tracking

    run_id = summary.get("run_id")
    if not run_id:
        return None
    return tracking.get_run(run_id).data.tags.get(tracking.TAG_PIPELINE_RUN)


def _gpu_note() -> str:
    import torch

    if torch.cuda.is_available():
        return f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return ""


__all__ = ["Budget", "CompareConfig", "METHODS", "Row", "collect", "render", "run_compare"]
