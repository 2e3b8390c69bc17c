"""Standard evaluation: the bundled lm-eval task, lm-eval's HFLM offline, the benchmark gate, the evaluation card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.lib import benchmarks
from kubetune.data import make_arithmetic


def test_bundled_task_is_the_generated_data_and_every_answer_is_right():
    shipped = [json.loads(line) for line in (benchmarks.DATA / "arithmetic_mc.jsonl").read_text().splitlines()]
    assert shipped == make_arithmetic.items()  # regenerating gives the same file
    assert len(shipped) == 300
    for item in shipped:
        a, op, b = item["question"].removeprefix("What is ").rstrip("?").split()
        assert int(item["choices"][item["answer"]]) == make_arithmetic.OPS[op](int(a), int(b))
        assert len(set(item["choices"])) == 4
    config = benchmarks.task_config("kubetune_arithmetic")
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()


def test_lm_eval_scores_the_packaged_smollm2_offline():
    from kubetune.core import models

    model = models.load_causal_lm("smollm2-135m-instruct").eval()
    tok = models.load_tokenizer("smollm2-135m-instruct")
    got = benchmarks.scores(model, tok, ["kubetune_arithmetic"], limit=12, batch_size=12)
    # Four choices: chance is 0.25; the base model knows some arithmetic (5 of these 12, measured).
    assert set(got) == {"bench_kubetune_arithmetic"}
    assert got["bench_kubetune_arithmetic"] == pytest.approx(5 / 12)


def test_benchmark_gate_names_the_drop():
    cand = {"bench_a": 0.50, "bench_b": 0.70, "exact_match": 0.9}
    assert benchmarks.gate(cand, {"bench_a": 0.51}, None, 0.02).startswith("pass: no benchmark drops")
    verdict = benchmarks.gate(cand, {"bench_a": 0.51}, {"bench_b": 0.80}, 0.02)
    assert verdict == "fail: b 0.7000 is 0.1000 below the champion's 0.8000 (allowed drop 0.02)"
    assert benchmarks.gate(cand, {"bench_a": 0.9}, None, -1) == "pass: gate off"
    assert benchmarks.gate({"exact_match": 0.9}, {}, None, 0.02) is None


def test_a_failed_benchmark_gate_keeps_the_champion(tmp_path):
    from kubetune.lib.report import EvalReport
    from kubetune.stages.register import RegisterConfig, decide

    report = EvalReport("exact_match", {"exact_match": 0.9}, base={"exact_match": 0.1})
    assert decide(report, RegisterConfig(model_name="m"))[0]
    report.benchmark_gate = "fail: kubetune_arithmetic 0.3000 is 0.2000 below the base's 0.5000 (allowed drop 0.02)"
    promote, reason = decide(report, RegisterConfig(model_name="m"))
    assert not promote and reason.startswith("kubetune_arithmetic 0.3000 is 0.2000 below")


def test_evaluate_scores_benchmarks_for_candidate_and_base_and_writes_the_card(tiny_llama, tiny_tickets, mlflow_uri,
                                                                              tmp_path, monkeypatch):
    import mlflow
    from test_llm_pyfunc import _trained

    from kubetune.lib.eval_card import render
    from kubetune.stages.evaluate import EvaluateConfig, evaluate
    from kubetune.tracking import RunContext

    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    ds, tok = tiny_tickets
    folder = _trained("lora", Path(tiny_llama), tmp_path / "trained")
    cfg = EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4,
                         benchmarks=["kubetune_arithmetic"], benchmark_limit=8, max_benchmark_drop=0.02)
    ctx = RunContext("tiny-bench", "run-1", "peft")
    report = evaluate(cfg, folder, ds, tok, tmp_path / "eval.json", ctx=ctx).report
    for who in ("candidate", "base"):
        assert 0.0 <= getattr(report, who)["bench_kubetune_arithmetic"] <= 1.0
    assert report.benchmark_gate == benchmarks.gate(report.candidate, report.base, None, 0.02)
    from kubetune.tracking import experiment_name

    (run,) = mlflow.search_runs(experiment_names=[experiment_name("tiny-bench")],
                                filter_string="tags.mlflow.runName = 'evaluate'", output_format="list")
    assert run.data.metrics["candidate_bench_kubetune_arithmetic"] == report.candidate["bench_kubetune_arithmetic"]
    card = render(report)
    assert "| bench_kubetune_arithmetic |" in card and "- benchmarks: " + report.benchmark_gate in card
    assert "## Samples (candidate)" in card and "champion (none yet)" in card
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation_card.md")
    assert logged == card
