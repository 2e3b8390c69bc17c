"""The `compare` pipeline: a pipeline of pipelines, for running `kubetune compare` on a cluster.

Not one of the method pipelines (``kubetune pipelines``): it is built for a list of methods.

Compile it:   kubetune compare --methods full,lora,dora --compile build/compare.yaml [--profile ...]
"""

from kfp import dsl

from kubetune.ops import kube
from kubetune.tools.compare import METHODS, Budget, CompareConfig, method_params
from kubetune.components import compare_report
from kubetune.ops.lifecycle import with_exit_handler
from kubetune.core.models import DEFAULT_BASE_MODEL
from kubetune.ops.runner import get_pipeline



def build(methods: list[str], profile=None, budget: Budget | None = None, data_uri: str = CompareConfig.data_uri,
          classification_uri: str = "", prefix: str = CompareConfig.prefix):
    """The comparison as one KFP pipeline: each method pipeline as a sub-DAG, then the report.

    The method pipelines are the same ones ``kubetune run`` uses (with the profile's GPUs and
    volumes); the report step runs after all of them and collects from the MLflow server.
    """
    budget = budget or Budget()
    shared = CompareConfig()  # the sizes every method gets (the main job's, kubetune.core.defaults)
    # Built out here: a pipeline may call another pipeline, but not define one inside it.
    subs = {METHODS[m][0]: get_pipeline(METHODS[m][0]).build(profile) for m in methods}

    @dsl.pipeline(name="compare", description="The fine-tuning methods side by side on the same data and budget.")
    def compare(base_model: str = DEFAULT_BASE_MODEL) -> str:
        tasks = []
        for method in methods:
            params = method_params(method, data_uri=data_uri, base_model=base_model, budget=budget, prefix=prefix,
                                   eval_settings=shared.eval_settings, batch_size=shared.batch_size,
                                   max_length=shared.max_length,
                                   classification_uri=classification_uri)
            params.pop("base_model")
            task = subs[METHODS[method][0]](base_model=base_model, **params)
            task.set_display_name(f"method-{method}")
            tasks.append(task)
        report = compare_report(methods=methods, prefix=prefix, data_uri=data_uri, base_model=base_model,
                                budget=budget.describe())
        report.after(*tasks)
        # The report reads every method's numbers back from MLflow: it needs the tracking URI too.
        kube.on_cluster(profile, cpu=[report])
        return report.outputs["Output"]

    # Built for a cluster only: its runs end in an exit handler (locally `kubetune compare` runs each method).
    return with_exit_handler(compare, profile)
