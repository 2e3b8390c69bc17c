"""The `moa` pipeline end to end through kfp.local on the tiny Llama, run once.

Three proposers fan out with ``dsl.ParallelFor`` and fan in with ``dsl.Collected``: the
tiny model as it is (a random model: it answers nothing useful) and two fine-tunes of it
through the training core, a long one and a short one, so the proposers differ in quality.
The mixture is registered as one pyfunc model, which then loads by alias and answers. The
later tests reuse that run's outputs and call the stages directly: a second evaluation
against the champion just registered (its recorded numbers are reused; equal is not
better, so the champion alias does not move) and a tuned synthesis aggregator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kubetune.methods import moa

LABELS = ["billing", "hardware", "network"]
KEYWORDS = {"billing": ["invoice", "refund", "billing"], "network": ["wifi", "router", "modem"],
            "hardware": ["battery", "screen", "printer"]}
FILLER = "the a of to and in is it that for on with please help today".split()
MODEL_NAME = "tiny-moa"
# Full fine-tuning of the 2-layer model: LoRA on it learns too slowly to tell proposers
# apart in a few seconds. 80 steps at 3e-3 get ~70% on the task, 25 steps nothing yet.
TRAIN = {"method": "full", "learning_rate": 3e-3, "batch_size": 8}
PROPOSERS = [
    {"name": "as-is", "max_new_tokens": 6},
    {"name": "long", "train": {**TRAIN, "max_steps": 80, "seed": 1}, "max_length": 64, "max_new_tokens": 6},
    {"name": "short", "train": {**TRAIN, "max_steps": 25, "seed": 2}, "max_length": 64, "max_new_tokens": 6},
]


def write_data(path: Path, n: int = 240) -> Path:
    """Keyword-first routing tickets: the keyword decides the team."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        words = [rng.choice(KEYWORDS[label])] + [rng.choice(FILLER) for _ in range(4)]
        rows.append({"instruction": "Route the ticket.", "input": " ".join(words), "output": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pipeline_run(tiny_llama, tmp_path_factory):
    """One run of the pipeline; its summary and the folder holding its outputs."""
    import mlflow

    from kubetune.ops.runner import run_local

    root = tmp_path_factory.mktemp("moa-pipeline")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        summary = run_local("moa", {
            "base_model": str(tiny_llama),
            "data_uri": str(write_data(root / "route.jsonl")),
            "proposers": PROPOSERS,
            "mode": "weighted",
            "aggregator": str(tiny_llama),
            "model_name": MODEL_NAME,
            "moa_settings": {"max_new_tokens": 6, "timeout": 30.0},
            "eval_settings": {"served_examples": 2},
        }, workdir=root)
        yield summary, root
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


def _output(root: Path, task: str, name: str) -> Path:
    """The kfp.local output ``name`` of the task ``task`` (one run in this folder)."""
    hits = [p for p in (root / ".kubetune" / "local_outputs").rglob(name) if p.parent.name.startswith(task)]
    assert len(hits) == 1, hits
    return hits[0]


def test_pipeline_registers_the_mixture_and_reports_each_proposer_and_mode(pipeline_run):
    summary, root = pipeline_run
    assert summary["model_name"] == MODEL_NAME and summary["version"] == "1"
    assert summary["promoted"] and set(summary["aliases"]) == {"challenger", "champion"}
    assert summary["primary_metric"] == "accuracy"

    report = json.loads(_output(root, "evaluate-moa", "report").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["as-is", "long", "short", "moa/majority", "moa/weighted", "moa/synthesis"]
    # The fine-tune through the core learned the task; the untouched random model did not.
    assert rows["long"]["accuracy"] >= 0.5 > rows["as-is"]["accuracy"]
    assert report["base_name"] == "long" and report["base"]["accuracy"] == rows["long"]["accuracy"]
    assert report["candidate"]["accuracy"] == rows["moa/weighted"]["accuracy"]
    # Cost adds up over the proposers, and synthesis adds the aggregator's tokens on top.
    assert rows["moa/weighted"]["tokens_per_answer"] == pytest.approx(
        sum(rows[n]["tokens_per_answer"] for n in ("as-is", "long", "short")))
    assert rows["moa/synthesis"]["tokens_per_answer"] > rows["moa/weighted"]["tokens_per_answer"]
    # The saved pyfunc answered like the offline evaluation, with nobody dropped.
    assert report["candidate"]["served_agreement"] == 1.0 and report["candidate"]["served_dropped"] == 0
    assert "| moa/weighted |" in report["table"]

    # Weights were fitted on the fit half: the long fine-tune is trusted most.
    weights = report["weights"]
    assert weights["long"] == max(weights.values()) > 0
    desc = json.loads(_output(root, "aggregate-moa", "model").joinpath("moa.json").read_text())
    assert set(desc["fit"]).isdisjoint(desc["eval"]) and len(desc["eval"]) == report["validation_examples"]


def test_registered_mixture_loads_by_alias_and_answers(pipeline_run):
    import mlflow.pyfunc
    import pandas as pd

    _, root = pipeline_run
    weights = json.loads(_output(root, "evaluate-moa", "report").read_text())["weights"]
    recorded = json.loads(_output(root, "aggregate-moa", "proposals").read_text())
    held = json.loads(_output(root, "aggregate-moa", "model").joinpath("moa.json").read_text())["eval"][:3]

    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = loaded.predict(pd.DataFrame({"prompt": [recorded["prompts"][i][-1]["content"] for i in held]}))
    for i, (_, row) in zip(held, out.iterrows()):
        proposals = json.loads(row["proposals"])
        assert json.loads(row["dropped"]) == {} and row["tokens"] > 0
        # Served, each proposer answers as it did in the pipeline (greedy), and the vote is
        # the weighted one the evaluation scored.
        assert proposals == {n: recorded["answers"][n]["text"][i] for n in ("as-is", "long", "short")}
        assert row["answer"] == moa.weighted_vote(proposals, weights, LABELS)
    assert any(a in LABELS for a in out["answer"])


def test_second_evaluation_reuses_the_champions_numbers_and_does_not_promote(pipeline_run):
    from kubetune import tracking
    from kubetune.stages.evaluate_moa import EvaluateMoAConfig, evaluate_moa
    from kubetune.stages.register import RegisterConfig, register

    _, root = pipeline_run
    model_dir = _output(root, "aggregate-moa", "model")
    result = evaluate_moa(EvaluateMoAConfig(model_name=MODEL_NAME, served_examples=0), model_dir,
                          _output(root, "aggregate-moa", "proposals"), root / "eval-again.json")
    report = result.report.to_dict()
    assert report["champion_version"] == "1"
    assert report["champion"]["accuracy"] == report["candidate"]["accuracy"]
    # Reused, not recomputed: the served-latency numbers only exist in the recorded tags.
    assert "served_latency_s" in report["champion"]
    assert report["beats_champion"] is False

    registered = register(RegisterConfig(model_name=MODEL_NAME), model_dir, root / "eval-again.json")
    assert registered.version == "2" and registered.aliases == ["challenger"] and not registered.promoted
    assert str(tracking.get_alias(MODEL_NAME, tracking.CHAMPION).version) == "1"


def test_tuned_aggregator_trains_through_the_core_and_serves_in_synthesis_mode(pipeline_run, tiny_llama):
    import mlflow.pyfunc
    import pandas as pd

    from kubetune.stages.aggregate_moa import MoAConfig, aggregate_moa

    _, root = pipeline_run
    answers = sorted(p for p in (root / ".kubetune" / "local_outputs").rglob("answers")
                     if (p / "proposer.json").exists())
    assert len(answers) == 3
    out = root / "tuned"
    result = aggregate_moa(
        MoAConfig(mode="synthesis", aggregator=str(tiny_llama), tune_aggregator=True, max_new_tokens=6,
                  aggregator_train={"max_steps": 12, "learning_rate": 1e-2}),
        answers, _output(root, "ingest", "dataset"), out / "model", out / "proposals.json",
        workspace=out / "workspace")
    assert result.aggregator_metrics["train_loss_last"] < result.aggregator_metrics["train_loss_first"]
    manifest = json.loads((out / "model" / "aggregator" / "kubetune_method.json").read_text())
    assert manifest["method"] == "lora" and manifest["shape"] == "chat"
    assert json.loads((out / "model" / "kubetune_method.json").read_text())["method"] == "moa"

    served = mlflow.pyfunc.load_model(str(out / "model")).predict(
        pd.DataFrame({"prompt": ["Route the ticket.\n\nwifi"]}))
    assert len(json.loads(served["proposals"].iloc[0])) == 3 and json.loads(served["dropped"].iloc[0]) == {}
    assert isinstance(served["answer"].iloc[0], str) and served["tokens"].iloc[0] > 0


def test_pipeline_compiles_with_proposers_fanned_out_and_collected(tmp_path):
    import yaml
    from kfp import compiler

    from kubetune.pipelines import PIPELINES, moa as moa_pipeline

    assert PIPELINES["moa"] is moa_pipeline
    path = tmp_path / "moa.yaml"
    compiler.Compiler().compile(moa_pipeline.pipeline, str(path))
    spec = yaml.safe_load(path.read_text())
    dag = spec["root"]["dag"]["tasks"]
    loop = next(t for t in dag.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("proposers")
    # aggregate-moa reads a list of artifacts: the proposers' answers, collected from the loop.
    answers = dag["aggregate-moa"]["inputs"]["artifacts"]["answers"]["taskOutputArtifact"]
    assert answers["producerTask"] == loop["taskInfo"]["name"]
    assert spec["components"]["comp-aggregate-moa"]["inputDefinitions"]["artifacts"]["answers"]["isArtifactList"]
    assert [t["taskInfo"]["name"] for t in dag.values()].count("register") == 1
