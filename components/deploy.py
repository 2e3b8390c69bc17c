from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def deploy(registered: str, model_name: str, pipeline: str, run_id: str, settings: dict = {}) -> str:
    """Serve the new champion (KServe on a cluster, `mlflow models serve` locally) and smoke-test it.

    Args:
        registered: register's JSON summary; nothing is deployed unless it promoted the version.
        model_name: Registered model name.
        pipeline: Pipeline name (lineage).
        run_id: KFP run id (lineage).
        settings: Further DeployConfig settings by name (target, namespace, endpoint, smoke_prompts, ...).

    Returns:
        A JSON summary: deployed, version, runtime, url, answers (or why nothing was deployed).
    """
    import json

    from kubetune.core.config import from_dict
    from kubetune.stages.deploy import DeployConfig
    from kubetune.stages.deploy import deploy as stage
    from kubetune.tracking import RunContext

    summary = json.loads(registered)
    if not summary.get("promoted"):
        return json.dumps({"deployed": False, "reason": "not promoted: the champion did not change"})
    cfg = from_dict(DeployConfig, {**settings, "model_name": model_name, "alias": str(summary["version"])},
                    "deploy settings")
    result = stage(cfg, ctx=RunContext(model_name, run_id, pipeline))
    return json.dumps({"deployed": True, "version": result.version, "runtime": result.runtime, "url": result.url,
                       "answers": result.answers})
