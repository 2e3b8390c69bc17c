"""What every pipeline shares at its start and its end.

- ``run_settings(...)``: the pipeline's model-shaping parameters as one text, passed to
  ``ingest``, which hashes it with the data and the code into the run key that decides
  whether anything changed since the champion (see ``kubetune.lib.run_keys``).
- ``with_exit_handler(pipeline, profile)``: the pipeline as compiled for a cluster, wrapped in a
  ``dsl.ExitHandler`` whose ``finalize`` step ends the pipeline run's MLflow parent run(s) with
  the run's outcome (and marks child runs a killed pod left RUNNING as KILLED). Locally the
  runner does the same after ``kfp.local`` returns or fails (``kubetune.ops.runner.run_local``).
"""

from __future__ import annotations

import inspect


def run_settings(**params) -> str:
    """``name=value`` lines, sorted by name, of pipeline parameters (KFP channels or values).

    Inside a pipeline the values are KFP parameters: the text is an f-string that KFP fills in
    when the task runs. Text rather than a dict: ``kfp.local`` cannot pass dict-valued pipeline
    parameters inside a dict constant, while it fills f-strings in (JSON for dicts).
    """
    return "\n".join(f"{name}={params[name]}" for name in sorted(params))


def with_exit_handler(pipeline, profile=None):
    """``pipeline`` inside a ``dsl.ExitHandler`` whose exit step ends its MLflow runs.

    The exit step runs whatever happened to the tasks (success, failure, cancellation) and is
    told the outcome by KFP (``dsl.PipelineTaskFinalStatus``). KFP allows no pipeline output
    from inside an exit handler, so the wrapped pipeline has none (the summary is register's
    output); it keeps the pipeline's name, description and parameters.

    Args:
        pipeline: A ``@dsl.pipeline`` (one of ``pipelines/*.py``'s ``build(profile)``).
        profile: The cluster profile; the exit step gets its CPU resources and MLflow settings.
    """
    from kfp import dsl

    from kubetune.ops import kube
    from kubetune.components import finalize

    signature = inspect.signature(pipeline.pipeline_func)

    def outer(*args, **kwargs):
        done = finalize(run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER).set_display_name("finalize")
        kube.no_cache(done)
        kube.on_cluster(profile, cpu=[done])
        with dsl.ExitHandler(done, name="pipeline"):
            pipeline(**signature.bind(*args, **kwargs).arguments)

    outer.__signature__ = signature.replace(return_annotation=inspect.Signature.empty)
    outer.__name__ = pipeline.pipeline_func.__name__
    return dsl.pipeline(name=pipeline.name, description=pipeline.component_spec.description)(outer)
