"""`kubetune compare`: the budget, the method table, the report, end to end through kfp.local."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from kubetune.tools.compare import (METHODS, Budget, CompareConfig, classification_view, method_params, parse_methods,
                              run_compare)
from kubetune.errors import ConfigError, DataError

EVAL = {"primary_metric": "val_loss", "max_examples": 4, "max_new_tokens": 8}


def _tickets(tmp_path, n=60):
    from kubetune.lib.storage import bundled

    path = tmp_path / "tickets.jsonl"
    path.write_text("\n".join(bundled("bundled://tickets").read_text().splitlines()[:n]) + "\n")
    return path


def test_budget_and_methods_parse_or_say_what_is_wrong():
    assert Budget.parse("steps:12") == Budget(steps=12)
    assert Budget.parse("time:90", steps=200) == Budget(steps=200, seconds=90.0)
    for bad in ("12", "steps:x", "hours:1"):
        with pytest.raises(ConfigError, match="--budget"):
            Budget.parse(bad)
    assert parse_methods("full, lora,feature-extraction") == ["full", "lora", "feature-extraction"]
    with pytest.raises(ConfigError, match="unknown method.*'lorra'"):
        parse_methods("full,lorra")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("lora,lora")


def test_every_method_gets_the_same_budget_and_its_own_registered_name():
    common = dict(data_uri="d", base_model="m", prefix="cmp", eval_settings={"max_examples": 8}, batch_size=3,
                  max_length=128, classification_uri="c")
    steps = {m: method_params(m, budget=Budget(steps=7, seconds=60), **common) for m in METHODS}
    for m, p in steps.items():
        assert p["model_name"] == f"cmp-{m}" and p["force"] is True and p["base_model"] == "m"
        if METHODS[m][0] == "feature-extraction":
            assert p["data_uri"] == "c" and "max_steps" not in p
        else:
            assert p["max_steps"] == 7 and p["max_length"] == 128 and p["data_uri"] == "d"
            assert p["train_settings"] == {"batch_size": 3, "max_train_seconds": 60}
    assert steps["dora"]["method"] == "dora" and steps["moe-lora"]["kind"] == "lora"
    assert "max_train_seconds" not in method_params("lora", budget=Budget(steps=7), **common)["train_settings"]
    # Each PEFT method its own learning rate: the virtual-token methods need far higher ones.
    lrs = {m: steps[m]["learning_rate"] for m in ("lora", "dora", "adapter", "ia3", "prefix", "prompt")}
    assert lrs == {"lora": 1e-3, "dora": 1e-3, "adapter": 1e-3, "ia3": 3e-3, "prefix": 3e-2, "prompt": 3e-2}
    assert "learning_rate" not in steps["full"] and "learning_rate" not in steps["moe"]


def test_classification_view_of_instruction_data(tmp_path):
    uri = classification_view(str(_tickets(tmp_path)), "issue", tmp_path / "out")
    rows = [json.loads(line) for line in open(uri)]
    assert len(rows) == 60 and {r["label"] for r in rows} <= {"billing", "hardware", "software", "shipping", "account"}
    assert all(r["text"] and "{" not in r["text"] for r in rows)
    with pytest.raises(ConfigError, match="--label-field"):
        classification_view(str(_tickets(tmp_path)), "", tmp_path / "out")
    with pytest.raises(DataError, match="record 1: field 'output'.*'colour'"):
        classification_view(str(_tickets(tmp_path)), "colour", tmp_path / "out")
    assert classification_view("bundled://reviews", "", tmp_path / "out") == "bundled://reviews"


def test_time_budget_stops_training_early(tiny_llama, tiny_tickets, tmp_path):
    from kubetune.stages.train_peft import train_peft
    from kubetune.core.train import TrainConfig

    cfg = TrainConfig(base_model=str(tiny_llama), method="lora", max_steps=10_000, batch_size=2,
                      max_train_seconds=2.0, save_steps=10_000)
    result = train_peft(cfg, tiny_tickets[1], tmp_path / "model", tmp_path / "ws")
    assert 1 <= result.metrics["steps"] < 10_000
    assert result.metrics["train_wall_s"] < 60
    with pytest.raises(ConfigError, match="max_train_seconds"):
        TrainConfig(max_train_seconds=-1)


def test_compare_runs_two_methods_and_reports_both(tiny_llama, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = CompareConfig(data_uri=str(_tickets(tmp_path)), methods=["lora", "feature-extraction"],
                        base_model=str(tiny_llama), budget=Budget(steps=6), max_length=512, eval_settings=EVAL,
                        label_field="issue", prefix="tiny-cmp", out_dir=str(tmp_path / "report"))
    rows, ctx = run_compare(cfg, workdir=tmp_path, echo=lambda *a: None)
    by = {r.method: r for r in rows}
    assert [r.status for r in rows] == ["ok", "ok"], [r.error for r in rows]
    lora, fx = by["lora"], by["feature-extraction"]
    # numbers read back from MLflow, each from its own pipeline run
    assert lora.metric_name == "val_loss" and lora.tuned < lora.base  # the adapter learned the task
    assert 0 < lora.trainable_params < lora.total_params and lora.steps == 6 and len(lora.loss_curve) >= 3
    assert lora.peak_mem_gb > 0 and lora.tokens_per_s > 0 and lora.version == "1"
    assert fx.metric_name == "macro_f1" and fx.trainable_params < fx.total_params and fx.version == "1"
    assert lora.pipeline_run_id != fx.pipeline_run_id

    md = (tmp_path / "report" / "compare.md").read_text()
    for r in rows:
        assert re.search(rf"^\| {r.method} \| {r.metric_name} \|", md, re.M)
    html = (tmp_path / "report" / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    data = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["lora", "feature-extraction"]
    arts = {a.path for a in MlflowClient().list_artifacts(ctx["mlflow_run_id"])}
    assert {"compare.md", "compare.html", "compare.json", "plots"} <= arts


def test_a_failing_method_is_a_row_not_a_crash(tiny_llama, tmp_path, mlflow_uri):
    cfg = CompareConfig(data_uri=str(tmp_path / "missing.jsonl"), methods=["lora"], base_model=str(tiny_llama),
                        budget=Budget(steps=2), eval_settings=EVAL, prefix="tiny-fail", out_dir=str(tmp_path / "r"))
    rows, _ = run_compare(cfg, workdir=tmp_path, echo=lambda *a: None)
    assert rows[0].status == "failed" and rows[0].error
    assert "| lora | failed:" in (tmp_path / "r" / "compare.md").read_text()


def test_compare_compiles_as_a_pipeline_of_pipelines(tmp_path):
    from kubetune.cli import main

    out = tmp_path / "compare.yaml"
    assert main(["compare", "--methods", "full,lora,dora", "--budget", "steps:20", "--compile", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    assert sorted(spec["root"]["dag"]["tasks"]) == ["exit-handler-1", "finalize"]  # its runs end there
    body = spec["components"][spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    tasks = spec["components"][body["compare"]["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(tasks) == ["compare-report", "full", "peft", "peft-2"]
    assert sorted(tasks["compare-report"]["dependentTasks"]) == ["full", "peft", "peft-2"]
    methods = {t["inputs"]["parameters"].get("method", {}).get("runtimeValue", {}).get("constant")
               for n, t in tasks.items() if n.startswith("peft")}
    assert methods == {"lora", "dora"}
    assert tasks["full"]["inputs"]["parameters"]["max_steps"]["runtimeValue"]["constant"] == 20


def test_seeds_give_each_run_its_training_seed_and_the_row_mean_and_spread(tmp_path):
    from kubetune.tools.compare import Row, summarise, table_rows

    common = dict(data_uri="d", base_model="m", prefix="cmp", eval_settings={}, batch_size=2, max_length=64)
    assert method_params("lora", budget=Budget(steps=5), seed=3, **common)["train_settings"]["seed"] == 3
    runs = [Row(method="lora", pipeline="peft", metric_name="exact_match", n=48, base=0.0, tuned=t,
                tuned_ci=(t - 0.1, t + 0.1), forgetting=f, steps=30, version=str(v))
            for v, (t, f) in enumerate([(0.60, 0.04), (0.70, 0.02), (0.80, 0.03)], 1)]
    row = summarise(runs)
    assert row.tuned == pytest.approx(0.70) and row.tuned_sd == pytest.approx(0.10)
    assert row.runs == [0.60, 0.70, 0.80] and row.forgetting == pytest.approx(0.03) and row.version == "1,2,3"
    cells = dict(zip(["method", "metric", "n", "base", "tuned"], table_rows([row])[0]))
    assert cells["n"] == "48" and cells["tuned"].startswith("0.700 ± 0.100 (3 seeds")
    one = table_rows([runs[0]])[0]
    assert one[4] == "0.600 [0.500, 0.700]"  # a single run shows its 95% interval instead


def test_seeds_must_be_a_whole_number_of_at_least_one(capsys):
    from kubetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--seeds", "0"])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err
