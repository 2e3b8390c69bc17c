from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def register(model: dsl.Input[dsl.Model], report: dsl.Input[dsl.Artifact], model_name: str, pipeline: str,
             run_id: str, max_forgetting: float = -1.0, settings: dict = {}) -> str:
    """Register a version; `challenger` always, `champion` only when it passes the promotion gates.

    Args:
        model: Output of a training stage.
        report: eval.json from evaluate (refused if missing or incomplete).
        model_name: Registered model name.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        max_forgetting: Gate on relative general-perplexity increase (negative = off).
        settings: Further RegisterConfig gates by name (min_improvement, require_complete).

    Returns:
        A JSON summary: version, aliases, promoted, reason, metrics.
    """
    import json

    from kubetune.core.config import from_dict
    from kubetune.stages.register import RegisterConfig
    from kubetune.stages.register import register as stage
    from kubetune.tracking import RunContext

    cfg = from_dict(RegisterConfig, {"max_forgetting": max_forgetting, **settings, "model_name": model_name},
                    "register settings")
    result = stage(cfg, model.path, report.path, ctx=RunContext(model_name, run_id, pipeline))
    return json.dumps(result.summary)


@dsl.component(base_image=CPU_IMAGE)
def register_skipped(fingerprint: str, model_name: str, pipeline: str, run_id: str) -> str:
    """End a pipeline run whose data is unchanged: recorded as skipped, no new version.

    Args:
        fingerprint: Data fingerprint from ingest (the same the champion was trained on).
        model_name: Registered model name.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).

    Returns:
        A JSON summary shaped like register's, with ``skipped: true``.
    """
    import json

    from kubetune.tracking.registry_ops import skipped_summary
    from kubetune.tracking import RunContext

    return json.dumps(skipped_summary(model_name, fingerprint, RunContext(model_name, run_id, pipeline)))
