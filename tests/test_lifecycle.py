"""How pipeline runs end in MLflow, and what decides that a pipeline has nothing to do.

The exit handler runs for real under kfp.local (its ``dsl.PipelineTaskFinalStatus`` included)
around a small pipeline whose stage process dies mid-stage, as a killed pod does; the runs are
read back from a real MLflow (SQLite).
"""


import uuid

import pytest
from kfp import dsl

from kubetune.ops.image import CPU_IMAGE
from kubetune.ops.lifecycle import run_settings, with_exit_handler
from kubetune.lib.run_keys import run_key


@dsl.component(base_image=CPU_IMAGE)
def stage_that_may_die(model_name: str, run_id: str, die: bool) -> str:
    import os

    from kubetune.tracking import RunContext

    with RunContext(model_name, run_id, "toy").stage("toy-stage"):
        if die:
            os._exit(3)  # killed mid-stage: nothing ends its MLflow run
    return "ok"


@dsl.pipeline(name="toy")
def toy(model_name: str, die: bool = False) -> str:
    return stage_that_may_die(model_name=model_name, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, die=die).output


def _runs(name: str) -> dict:
    import mlflow

    runs = mlflow.search_runs(experiment_names=[f"kubetune/{name}"], output_format="list")
    out = {}
    for r in runs:
        out.setdefault(r.data.tags["kubetune.stage"], []).append(r)
    return out


def test_exit_handler_ends_the_parent_run_with_the_outcome(mlflow_uri, tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "outputs"))
    wrapped = with_exit_handler(toy)

    ok = f"ok-{uuid.uuid4().hex[:6]}"
    wrapped(model_name=ok)
    runs = _runs(ok)
    assert [r.info.status for r in runs["pipeline"]] == ["FINISHED"]
    assert [r.info.status for r in runs["toy-stage"]] == ["FINISHED"]

    dead = f"dead-{uuid.uuid4().hex[:6]}"
    with pytest.raises(RuntimeError, match="FAILURE"):
        wrapped(model_name=dead, die=True)
    runs = _runs(dead)
    (parent,) = runs["pipeline"]
    assert parent.info.status == "FAILED" and parent.data.tags["kubetune.status"] == "failed"
    (child,) = runs["toy-stage"]
    assert child.info.status == "KILLED" and child.data.tags["kubetune.ended_by"] == "pipeline end (failed)"


def test_every_compiled_pipeline_ends_its_runs_in_an_exit_handler(tmp_path):
    import yaml

    from kubetune.ops.runner import compile_all

    for path in compile_all(tmp_path, None):
        spec = yaml.safe_load(path.read_text())
        root = spec["root"]["dag"]["tasks"]
        assert set(root) == {"exit-handler-1", "finalize"}, (path.name, sorted(root))
        assert root["finalize"]["dependentTasks"] == ["exit-handler-1"]
        assert root["finalize"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
        assert spec["components"]["comp-finalize"]["inputDefinitions"]["parameters"]["status"]["parameterType"] \
            == "TASK_FINAL_STATUS"


def test_the_run_key_changes_with_what_shapes_the_model():
    """`kubetune run peft --set method=dora --set max_steps=100` after `make run` (LoRA, 30 steps)
    on the same data must train: its run key differs from the LoRA champion's."""
    lora = run_settings(base_model="smollm2-135m", method="lora", max_steps=30, train_settings={"batch_size": 2})
    dora = run_settings(base_model="smollm2-135m", method="dora", max_steps=100, train_settings={"batch_size": 2})
    assert run_key("fp", lora) == run_key("fp", lora)
    assert run_key("fp", dora) != run_key("fp", lora)
    assert run_key("fp", run_settings(base_model="other", method="lora", max_steps=30,
                                      train_settings={"batch_size": 2})) != run_key("fp", lora)
    assert run_key("fp-other-split", lora) != run_key("fp", lora)
