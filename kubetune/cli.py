"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys

from kubetune import __version__
from kubetune.errors import KubetuneError


def _params(args) -> dict:
    from kubetune.config import load_file, parse_set

    params = load_file(args.config) if args.config else {}
    params.update(parse_set(args.set or []))
    return params


def cmd_run(args) -> int:
    from kubetune.runner import format_summary, run_local

    summary = run_local(args.pipeline, _params(args))
    print(format_summary(summary))
    return 0


def cmd_compile(args) -> int:
    from kubetune.runner import compile_all

    for path in compile_all(args.out, args.profile, args.pipeline or None):
        print(f"wrote {path}")
    return 0


def cmd_pipelines(args) -> int:
    from kubetune.pipelines import PIPELINES

    width = max(len(n) for n in PIPELINES)
    for name, module in PIPELINES.items():
        print(f"{name:<{width}}  {module.DESCRIPTION}")
    return 0


def cmd_validate(args) -> int:
    import tempfile
    from pathlib import Path

    from kubetune.errors import DataError
    from kubetune.stages.ingest import IngestConfig, _ingest

    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = _ingest(IngestConfig(data_uri=args.data_uri, shape=args.shape), Path(tmp) / "out", Path(tmp))
    except DataError as e:
        print(f"{args.data_uri}: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    print(f"{args.data_uri}: OK  shape={result.shape}  fingerprint={result.fingerprint}  {counts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="LLM fine-tuning as Kubeflow Pipelines.")
    p.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline locally through kfp.local")
    r.add_argument("pipeline")
    r.add_argument("--config", help="YAML file of pipeline parameters")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compile", help="compile pipelines to KFP YAML")
    c.add_argument("pipeline", nargs="*", help="pipelines to compile (default: all)")
    c.add_argument("--out", default="build", help="output folder (default: build)")
    c.add_argument("--profile", help="cluster profile YAML (GPUs, resources, volumes, secrets)")
    c.set_defaults(func=cmd_compile)

    sub.add_parser("pipelines", help="list the pipelines").set_defaults(func=cmd_pipelines)

    v = sub.add_parser("validate", help="validate a dataset (ingest's checks alone)")
    v.add_argument("data_uri")
    v.add_argument("--shape", default="auto")
    v.set_defaults(func=cmd_validate)
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
