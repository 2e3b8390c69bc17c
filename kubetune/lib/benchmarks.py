"""Standard benchmarks for evaluate: lm-eval-harness tasks, scored for candidate, base and champion.

The harness is the field's common yardstick; kubetune only hands it the model already loaded
(an adapter on its base or a whole model, through lm-eval's ``HFLM``) and the tasks chosen in
evaluate's settings. Any task name lm-eval knows works where its data can be downloaded; the
bundled task ``kubetune_arithmetic`` (``kubetune/data/arithmetic_mc.yaml``) needs nothing and
keeps the path testable offline.

Scores go into each model's metrics as ``bench_<task>`` (the task's first metric, e.g. ``acc``),
so MLflow, the version tags and the model card carry them like any other number. The gate
(``max_benchmark_drop``): no benchmark of the candidate may fall more than that many points
(0.02 = two accuracy points) below the base model's or the champion's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "data"
# The bundled tasks: name -> task YAML (its data file sits next to it).
LOCAL_TASKS = {"kubetune_arithmetic": DATA / "arithmetic_mc.yaml"}
PREFIX = "bench_"


def task_config(name: str) -> dict | str:
    """A bundled task as the config dict lm-eval takes, its data file made absolute; other names as they are."""
    if name not in LOCAL_TASKS:
        return name
    path = LOCAL_TASKS[name]
    config = yaml.safe_load(path.read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(path.parent / f) for split, f in files.items()}
    return config


def scores(model, tokenizer, tasks: list[str], limit: int = 0, batch_size: int = 16) -> dict[str, float]:
    """Run the lm-eval tasks on a loaded model.

    Args:
        model: A transformers model or PEFT model, in eval mode.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names (bundled or known to lm-eval).
        limit: Items per task (0 = all).
        batch_size: Requests per forward pass.

    Returns:
        ``{"bench_<task>": score}``, the task's first metric (higher is better).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval logs every request batch at INFO and warns that a loaded model ignores some of its
    # own arguments (which is how it is used here): the evaluate log keeps only its errors.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=2048)
    # Indexing lm-eval's thousands of task files takes seconds: only when a task needs it.
    manager = TaskManager(include_defaults=any(t not in LOCAL_TASKS for t in tasks))
    results = lm_eval.simple_evaluate(model=lm, tasks=[task_config(t) for t in tasks], task_manager=manager,
                                      limit=limit or None, log_samples=False, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out = {}
    for task in tasks:
        metrics = results["results"][task]
        first = next(k for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr"))
        out[f"{PREFIX}{task}"] = float(metrics[first])
    return out


def gate(candidate: dict, base: dict | None, champion: dict | None, max_drop: float) -> str | None:
    """The gate's verdict in words (``pass: ...`` / ``fail: ...``), or None when there is nothing to check."""
    names = sorted(k for k in candidate if k.startswith(PREFIX))
    if not names:
        return None
    if max_drop < 0:
        return "pass: gate off"
    drops = []
    for who, ref in (("base", base or {}), ("champion", champion or {})):
        for k in names:
            if k in ref and ref[k] - candidate[k] > max_drop:
                drops.append(f"{k[len(PREFIX):]} {candidate[k]:.4f} is {ref[k] - candidate[k]:.4f} below the "
                             f"{who}'s {ref[k]:.4f}")
    if drops:
        return f"fail: {'; '.join(drops)} (allowed drop {max_drop})"
    return f"pass: no benchmark drops by more than {max_drop} ({', '.join(k[len(PREFIX):] for k in names)})"
