"""Standard evaluation: the bundled lm-eval task, lm-eval's HFLM offline and the benchmark gate. The
evaluate stage scoring them is tests/test_evaluate.py's; register keeping the champion on a failed
gate is tests/test_register.py's."""

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


