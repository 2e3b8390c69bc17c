from kfp import dsl

from kubetune.ops.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE)
def compare_report(methods: list, prefix: str, data_uri: str, base_model: str, budget: str,
                   report: dsl.Output[dsl.Artifact]) -> str:
    """The comparison report of `kubetune compare` on a cluster, after every method pipeline ran.

    Args:
        methods: The compared methods (kubetune.tools.compare.METHODS keys), in report order.
        prefix: Model-name prefix: method M registered as PREFIX-M.
        data_uri: The data every method trained on (for the report's header).
        base_model: The shared base model.
        budget: The shared budget, in words.
        report: Folder with compare.md, compare.html, compare.json and the plots.

    Returns:
        The report's rows as JSON.
    """
    import json
    import os
    from pathlib import Path

    from kubetune.tools.compare import CompareConfig, collect, log_report, render

    rows = [collect(m, f"{prefix}-{m}") for m in methods]
    shared = CompareConfig()  # the sizes pipelines/compare.py gave every method
    context = {"data_uri": data_uri, "base_model": base_model, "budget": budget, "batch_size": shared.batch_size,
               "max_length": shared.max_length, "eval_settings": shared.eval_settings, "label_field": "", "prefix": prefix,
               "machine": f"cluster ({os.environ.get('KUBETUNE_PROFILE', 'profile')})"}
    paths = render(rows, context, Path(report.path))
    log_report(paths, rows, context)
    return json.dumps(json.loads(paths["json"].read_text())["rows"])
