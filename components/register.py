from kfp import dsl

from kubetune.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def register(model: dsl.Input[dsl.Model], report: dsl.Input[dsl.Artifact], model_name: str, pipeline: str,
             run_id: str, max_forgetting: float = -1.0) -> str:
    """Register a version; `challenger` always, `champion` only when evaluate says it earned it.

    Args:
        model: Output of a training stage.
        report: eval.json from evaluate (refused if missing or incomplete).
        model_name: Registered model name.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        max_forgetting: Gate on relative general-perplexity increase (negative = off).

    Returns:
        A JSON summary: version, aliases, promoted, reason, metrics.
    """
    import json

    from kubetune.stages.register import RegisterConfig
    from kubetune.stages.register import register as stage
    from kubetune.tracking import RunContext

    result = stage(RegisterConfig(model_name=model_name, max_forgetting=max_forgetting), model.path, report.path,
                   ctx=RunContext(model_name, run_id, pipeline))
    return json.dumps(result.summary)
