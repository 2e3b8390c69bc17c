"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune import __version__
from kubetune.errors import KubetuneError


def _params(args) -> dict:
    from kubetune.core.config import load_file, parse_set

    params = load_file(args.config) if args.config else {}
    params.update(parse_set(args.set or []))
    return params


def cmd_run(args) -> int:
    from kubetune.ops.runner import format_summary, run_local

    if args.help or not args.pipeline:
        from kubetune.ops.run_ui import run_help

        print(run_help(args.pipeline, args.parser))
        return 0 if args.help else 2
    summary = run_local(args.pipeline, _params(args), verbose=args.verbose)
    print(format_summary(summary))
    return 0


def _note_without_profile(args) -> None:
    if not args.profile:
        print("kubetune: note: no --profile: the pipelines carry no MLflow tracking URI, secrets or volumes; "
              "in a pod their stages stop rather than track to a file (docs/kubernetes.md, Profiles)",
              file=sys.stderr)


def cmd_compile(args) -> int:
    from kubetune.ops.runner import compile_all

    _note_without_profile(args)
    for path in compile_all(args.out, args.profile, args.pipeline or None):
        print(f"wrote {path}")
    return 0


def cmd_submit(args) -> int:
    from kubetune.ops.submit import submit

    _note_without_profile(args)
    s = submit(args.pipeline, host=args.host, params=_params(args), profile_path=args.profile,
               experiment=args.experiment, namespace=args.namespace, run_name=args.name, wait=args.wait,
               timeout_s=args.timeout, poll_s=args.poll)
    print(f"run {s.run_id}{' ' + s.state if s.state else ''}: {s.url}")
    return 0


def cmd_pipelines(args) -> int:
    from kubetune.pipelines import PIPELINES

    width = max(len(n) for n in PIPELINES)
    for name, module in PIPELINES.items():
        print(f"{name:<{width}}  {module.DESCRIPTION}")
    return 0


def cmd_validate(args) -> int:
    from kubetune.core.config import from_dict
    from kubetune.errors import DataError
    from kubetune.stages.ingest import IngestConfig, check

    cfg = from_dict(IngestConfig, {"data_uri": args.data_uri, "shape": args.shape}, "kubetune validate")
    try:
        result = check(cfg)
    except DataError as e:
        print(str(e) if str(e).startswith(args.data_uri) else f"{args.data_uri}: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    print(f"{args.data_uri}: OK  shape={result.shape}  fingerprint={result.fingerprint}  {counts}")
    return 0


def cmd_promote(args) -> int:
    from kubetune.tracking.registry_ops import promote

    out = promote(args.name, args.version, force=args.force)
    print(out.message, file=sys.stdout if out.moved else sys.stderr)
    return 0 if out.moved else 1


def cmd_rollback(args) -> int:
    from kubetune.tracking.registry_ops import rollback

    out = rollback(args.name)
    print(out.message, file=sys.stdout if out.moved else sys.stderr)
    return 0 if out.moved else 1


def cmd_models(args) -> int:
    from kubetune.tracking.registry_ops import models_table

    print(models_table(args.name))
    return 0


def cmd_deploy(args) -> int:
    """Run the deploy stage; print the outcome in a few lines."""
    import yaml

    from kubetune.serving.deploy import describe, render
    from kubetune.stages.deploy import DeployConfig, deploy

    name, _, alias = args.model.partition("@")
    cfg = DeployConfig(model_name=name, alias=alias or "champion", target=args.target, namespace=args.namespace,
                       endpoint=args.endpoint, keep_serving=args.keep, port=args.port, rollback=not args.no_rollback,
                       **({"smoke_prompts": args.prompt} if args.prompt else {}))
    if args.render:
        target = describe(cfg.model_name, cfg.alias)
        print(yaml.safe_dump(render(target, namespace=cfg.namespace or "default", gpus=cfg.gpus), sort_keys=False))
        return 0
    result = deploy(cfg)
    print(f"deployed {name} v{result.version} ({result.runtime}) at {result.url}")
    for prompt, answer in zip(cfg.smoke_prompts, result.answers):
        print(f"  {prompt!r} -> {answer[:80]!r}")
    if result.pid:
        print(f"  serving (pid {result.pid}); stop it with: kill {result.pid}")
    return 0


def cmd_schedule(args) -> int:
    from kubetune.ops.schedule import format_schedules, schedule

    _note_without_profile(args)
    s = schedule(args.pipeline, args.cron, host=args.host, params=_params(args), profile_path=args.profile,
                 name=args.name, experiment=args.experiment, namespace=args.namespace, catchup=args.catchup)
    print(format_schedules([s]))
    return 0


def cmd_schedules(args) -> int:
    from kubetune.ops.schedule import format_schedules, schedules

    print(format_schedules(schedules(args.host, args.namespace)))
    return 0


def cmd_unschedule(args) -> int:
    from kubetune.ops.schedule import unschedule

    s = unschedule(args.schedule, args.host, args.namespace)
    print(f"deleted schedule {s.id} ({s.name})")
    return 0


def seeds_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return int(text)


def cmd_compare(args) -> int:
    from kubetune.tools.compare import COLUMNS, Budget, CompareConfig, parse_methods, run_compare, table_rows

    methods = parse_methods(args.methods)
    budget = Budget.parse(args.budget, steps=args.steps)
    if args.compile:
        from kfp import compiler

        from kubetune.tools.compare import classification_view, default_label_field
        from kubetune.pipelines.compare import build
        from kubetune.ops.runner import load_profile

        profile = load_profile(args.profile) if args.profile else None
        label = default_label_field(args.data, args.label_field or "")
        cls_uri = ""
        if "feature-extraction" in methods:
            # on a cluster the derived data must be where the pods read: --classification-data
            cls_uri = args.classification_data or classification_view(args.data, label, Path(args.out))
        compiler.Compiler().compile(build(methods, profile, budget, args.data, cls_uri, args.prefix), args.compile)
        print(f"wrote {args.compile}")
        return 0
    cfg = CompareConfig(data_uri=args.data, methods=methods, base_model=args.base_model or "", budget=budget,
                        batch_size=args.batch_size, max_length=args.max_length, label_field=args.label_field or "",
                        prefix=args.prefix, out_dir=args.out, seeds=args.seeds)
    if args.report_only:
        from kubetune.tools.compare import report_only

        rows, ctx = report_only(cfg)
    else:
        rows, ctx = run_compare(cfg)
    print("\n== kubetune compare: " + ctx["budget"] + " ==")
    print("  " + " | ".join(COLUMNS))
    for r in table_rows(rows):
        print("  " + " | ".join(r))
    print(f"  report: {ctx['paths']['html']} (and .md, .json); MLflow run {ctx['mlflow_run_id']}")
    return 0 if all(r.status == "ok" for r in rows) else 1


def _kfp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT); a bearer token is read "
                                  "from $KF_PIPELINES_TOKEN, other auth as the KFP client does")
    p.add_argument("--namespace", help="Kubernetes namespace of the runs (default: the profile's; multi-user KFP: "
                                       "your Profile namespace)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="LLM fine-tuning as Kubeflow Pipelines.")
    p.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline locally through kfp.local", add_help=False)
    r.add_argument("pipeline", nargs="?", help="pipeline name ('kubetune run NAME --help' lists its parameters)")
    r.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: its parameters)")
    r.add_argument("--verbose", action="store_true", help="stream the tasks' full logs (always in .kubetune/logs/)")
    r.add_argument("--config", help="YAML file of pipeline parameters")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    r.set_defaults(func=cmd_run, parser=r)

    c = sub.add_parser("compile", help="compile pipelines to KFP YAML")
    c.add_argument("pipeline", nargs="*", help="pipelines to compile (default: all)")
    c.add_argument("--out", default="build", help="output folder (default: build)")
    c.add_argument("--profile", help="cluster profile YAML (GPUs, resources, volumes, secrets)")
    c.set_defaults(func=cmd_compile)

    sub.add_parser("pipelines", help="list the pipelines").set_defaults(func=cmd_pipelines)

    from kubetune.tools.compare import DEFAULT_METHODS, METHODS, CompareConfig

    compare_defaults = CompareConfig()  # the main job's data and sizes (kubetune.core.defaults)
    steps = compare_defaults.budget.steps
    cp = sub.add_parser("compare", help="run several methods on the same data and budget; a report with plots")
    cp.add_argument("--data", default=compare_defaults.data_uri, help=f"data URI (default: {compare_defaults.data_uri})")
    cp.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of: {', '.join(METHODS)} "
                                                                  f"(default: {DEFAULT_METHODS})")
    cp.add_argument("--base-model", help="base model for every method (default: the packaged SmolLM2)")
    cp.add_argument("--budget", default=f"steps:{steps}", help="'steps:N' (same optimizer steps) or 'time:SECONDS' "
                                                        "(same training seconds; --steps is then the schedule's "
                                                        "horizon)")
    cp.add_argument("--steps", type=int, default=steps, help=f"schedule horizon for a time budget (default: {steps})")
    cp.add_argument("--batch-size", type=int, default=compare_defaults.batch_size,
                    help=f"rows per step, every method (default: {compare_defaults.batch_size})")
    cp.add_argument("--max-length", type=int, default=compare_defaults.max_length,
                    help=f"tokens per row, every method (default: {compare_defaults.max_length})")
    cp.add_argument("--label-field", help="feature-extraction on instruction data: the JSON answer key that "
                                          "becomes the class (bundled tickets: issue)")
    cp.add_argument("--seeds", type=seeds_arg, default=compare_defaults.seeds, help="training runs per method (seeds 0..N-1, same "
                                                                 "split); the report shows mean ± spread (default: 1)")
    cp.add_argument("--prefix", default=compare_defaults.prefix, help="registered models are named PREFIX-METHOD")
    cp.add_argument("--out", default=compare_defaults.out_dir, help=f"report folder (default: {compare_defaults.out_dir})")
    cp.add_argument("--report-only", action="store_true", help="no training: the report from the newest run of "
                                                                   "each PREFIX-METHOD model already in MLflow")
    cp.add_argument("--compile", metavar="YAML", help="write the pipeline-of-pipelines for a cluster instead")
    cp.add_argument("--profile", help="cluster profile YAML (with --compile)")
    cp.add_argument("--classification-data", help="with --compile: URI of the text/label view of the data "
                                                  "for feature-extraction, readable from the cluster")
    cp.set_defaults(func=cmd_compare)

    from kubetune.tools.advise import add_advise_parser

    add_advise_parser(sub)

    v = sub.add_parser("validate", help="validate a dataset (ingest's checks alone)")
    v.add_argument("data_uri")
    v.add_argument("--shape", default="auto")
    v.set_defaults(func=cmd_validate)

    pr = sub.add_parser("promote", help="make a model version the champion (through the promotion gates)")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="skip the gates (recorded on the version)")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="champion back to the previous champion (recorded history)")
    rb.add_argument("name", help="registered model name")
    rb.set_defaults(func=cmd_rollback)

    m = sub.add_parser("models", help="a registered model's versions: aliases, metrics, decisions, lineage")
    m.add_argument("name", help="registered model name")
    m.set_defaults(func=cmd_models)

    sm = sub.add_parser("submit", help="one run of a pipeline on a KFP cluster (a new pipeline version)")
    sm.add_argument("pipeline")
    sm.add_argument("--config", help="YAML file of pipeline parameters")
    sm.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    sm.add_argument("--profile", help="cluster profile to compile with (namespace, service account, GPUs, secrets)")
    sm.add_argument("--name", help="run name (default: kubetune-PIPELINE-<UTC time>)")
    sm.add_argument("--experiment", default="kubetune", help="KFP experiment (default: kubetune)")
    sm.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 unless it succeeded")
    sm.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="with --wait: give up after SECONDS")
    sm.add_argument("--poll", type=float, default=15.0, help="with --wait: seconds between state checks")
    _kfp_options(sm)
    sm.set_defaults(func=cmd_submit)
    from kubetune.serving.deploy import add_deploy_parser

    add_deploy_parser(sub, cmd_deploy)

    s = sub.add_parser("schedule", help="retrain on a schedule: a KFP recurring run of a pipeline")
    s.add_argument("pipeline")
    s.add_argument("--cron", required=True, help="cron expression, 5 fields ('0 3 * * 1') or KFP's 6")
    s.add_argument("--config", help="YAML file of pipeline parameters")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    s.add_argument("--profile", help="cluster profile YAML to compile with")
    s.add_argument("--name", help="schedule name (default: kubetune-PIPELINE)")
    s.add_argument("--experiment", default="kubetune", help="KFP experiment (default: kubetune)")
    s.add_argument("--catchup", action="store_true", help="backfill missed intervals after a pause")
    _kfp_options(s)
    s.set_defaults(func=cmd_schedule)

    ss = sub.add_parser("schedules", help="list the KFP recurring runs")
    _kfp_options(ss)
    ss.set_defaults(func=cmd_schedules)

    us = sub.add_parser("unschedule", help="delete a KFP recurring run (by id or name)")
    us.add_argument("schedule", help="recurring run id or name")
    _kfp_options(us)
    us.set_defaults(func=cmd_unschedule)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KubetuneError as e:
        print(f"kubetune: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
