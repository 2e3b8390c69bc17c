"""How a pipeline body is wired around its stages: the skip branch, and where each task runs.

Every method pipeline reads as its sentence ("ingest, tokenize, train, evaluate, register")
with two pieces of wiring around it, each written once here:

- ``unless_unchanged(data, **lineage)``: the stages after ``ingest`` run only when ``ingest``
  found something changed since the champion (data and split, settings, code; see
  docs/registry.md). Otherwise ``register_skipped`` records the skip. ``skip_if_unchanged`` is
  the same branch for a body that goes on with ``dsl.Elif``/``dsl.Else`` (one branch per way
  to train), since KFP's ``dsl.OneOf`` takes outputs of one flat if/elif/else group only.
- ``place(profile, cpu=[...], gpu=[...], eval=[...], once=[...])``: every task named once, in
  its role; the profile's resources go to each (``kube.on_cluster``) and caching is off for
  all of them, since no step is a pure function of its inputs: the data behind a URI changes
  (retraining on fresh data), evaluate reads the current champion, register writes the
  registry, and a proposer may be a live endpoint or a moving alias.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from kubetune.ops import kube


@dataclass
class Unchanged:
    """The skip branch of a pipeline: ``skipped`` is its ``register_skipped`` task, once the
    ``with unless_unchanged(...)`` block has closed (None inside it)."""

    skipped: Any = None


@contextlib.contextmanager
def unless_unchanged(data, **lineage) -> Iterator[Unchanged]:
    """Run the block only when ``ingest`` found a change; otherwise record the skip.

    The block is the ``data-changed`` branch of a ``dsl.If`` on ingest's ``unchanged`` output;
    the ``data-unchanged`` branch is one ``register_skipped`` task, whose summary (``skipped:
    true`` and the reason) is the pipeline's result in that case::

        with unless_unchanged(data, **lineage) as run:
            tokens = tokenize_data(...)
            ...
            registered = register(...)
        return dsl.OneOf(registered.output, run.skipped.output)

    Args:
        data: The ``ingest`` task (outputs ``unchanged``, ``dataset`` and its fingerprint).
        **lineage: ``model_name``, ``pipeline`` and ``run_id``, as every stage takes them.

    Yields:
        The branch; its ``skipped`` task is set when the block closes.
    """
    from kfp import dsl

    run = Unchanged()
    with dsl.If(data.outputs["unchanged"] == False, name="data-changed"):  # noqa: E712 - a KFP condition
        yield run
    with dsl.Else(name="data-unchanged"):
        run.skipped = _register_skipped(data, lineage)


def skip_if_unchanged(data, **lineage):
    """The first branch of an if/elif/else group: ``register_skipped`` when nothing changed.

    For a body with one branch per way to train; it goes on with ``dsl.Elif``/``dsl.Else``::

        skipped = skip_if_unchanged(data, **lineage)
        with dsl.Elif(method == "full", name="all-weights"):
            ...
        with dsl.Else(name="peft-method"):
            ...
        return dsl.OneOf(skipped.output, registered_full.output, registered_peft.output)

    Args:
        data: The ``ingest`` task.
        **lineage: ``model_name``, ``pipeline`` and ``run_id``.

    Returns:
        The ``register_skipped`` task.
    """
    from kfp import dsl

    with dsl.If(data.outputs["unchanged"] == True, name="data-unchanged"):  # noqa: E712 - a KFP condition
        return _register_skipped(data, lineage)


def _register_skipped(data, lineage: dict):
    from kubetune.components import register_skipped

    return register_skipped(fingerprint=data.outputs["Output"], **lineage)


def place(profile: "kube.Profile | None", *, cpu: list = (), gpu: list = (), eval: list = (),
          once: list = ()) -> None:
    """Name every task of the pipeline once, in its role; apply the profile and turn caching off.

    The roles are ``kube.on_cluster``'s: ``cpu`` steps are retried after a failure, ``gpu``
    steps train on every GPU of the profile, ``eval`` steps get one GPU, ``once`` steps have
    side effects outside KFP (``register``) and are never retried. A task of the pipeline left
    out (it would run without the tracking URI, secrets and volume, and be served from the
    cache) or named twice is refused when the pipeline is built. Graph components (sub-DAGs)
    are not named: their own body places their tasks.

    Args:
        profile: The cluster profile, or None (a local run, or a compile that names none).
        cpu: Steps without a GPU.
        gpu: Training steps.
        eval: Evaluation and inference steps.
        once: Steps never retried.

    Raises:
        ValueError: naming the task left out or named twice.
    """
    from kfp.dsl import pipeline_context

    named = [*cpu, *gpu, *eval, *once]
    twice = sorted({t.name for t in named if sum(u is t for u in named) > 1})
    if twice:
        raise ValueError(f"place(): task(s) {twice} named in more than one role")
    pipeline = pipeline_context.Pipeline.get_default_pipeline()
    if pipeline is not None:
        left_out = sorted(name for name, task in pipeline.tasks.items()
                          if task.pipeline_spec is None and not any(t is task for t in named))
        if left_out:
            raise ValueError(f"place(): task(s) {left_out} of pipeline {pipeline.name!r} have no role; "
                             f"name each in cpu=, gpu=, eval= or once=")
    kube.on_cluster(profile, cpu=cpu, gpu=gpu, eval=eval, once=once)
    for task in named:
        kube.no_cache(task)
