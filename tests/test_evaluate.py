"""The evaluate stage: it reuses the base model's and the champion's scores only when the evaluation
would be identical, and scores benchmarks for candidate and base into the report, MLflow and the card."""

import os
from pathlib import Path

import datasets

from kubetune.lib import benchmarks
from kubetune.stages import evaluate as ev
from kubetune.lib.dataset import load_dataset_dir


def test_base_scores_are_reused_only_for_an_identical_evaluation(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    calls = []
    real = ev.score_model
    monkeypatch.setattr(ev, "score_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds, tok_dir = tiny_tickets
    meta, _, val_records = load_dataset_dir(ds)
    val_rows = list(datasets.load_from_disk(str(tok_dir))["validation"])
    tok = AutoTokenizer.from_pretrained(tok_dir / "tokenizer")
    cfg = ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4)
    args = (tok, val_records, val_rows, meta["shape"], ["A short general sentence about the weather."])

    first = ev._base_scores(cfg, *args)
    again = ev._base_scores(cfg, *args)
    assert len(calls) == 1 and again.pop("reused") is True
    assert again == first  # the same numbers, not recomputed

    ev._base_scores(ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=3, max_new_tokens=4, batch_size=4),
                    *args)
    assert len(calls) == 2  # another setting: another key

    # Other validation data, everything else equal: the tokenized rows alone, then the records alone.
    tok_, records, rows, shape, general = args
    ev._base_scores(cfg, tok_, records, rows[1:], shape, general)
    assert len(calls) == 3
    ev._base_scores(cfg, tok_, [dict(r) for r in reversed(records)], rows, shape, general)
    assert len(calls) == 4
    # Other kubetune code (metric or decoding changes): another key.
    from kubetune.lib import run_keys

    code_hash = run_keys.code_hash
    monkeypatch.setattr(run_keys, "code_hash", lambda: "other-code")
    ev._base_scores(cfg, *args)
    assert len(calls) == 5
    monkeypatch.setattr(run_keys, "code_hash", code_hash)
    ev._base_scores(cfg, *args)
    assert len(calls) == 5  # the same code again: reused

    weights = next(tiny_llama.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, (st.st_atime, st.st_mtime + 10))  # the base weights changed (as far as we can tell)
    ev._base_scores(cfg, *args)
    assert len(calls) == 6

    ev._base_scores(ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4,
                                      reuse_base_scores=False), *args)
    assert len(calls) == 7


def test_champion_scores_are_reused_only_for_the_same_validation_settings_and_code(
        tiny_llama, tiny_tickets, mlflow_uri, tmp_path, monkeypatch):
    """evaluate takes the champion's recorded numbers instead of scoring it again only when the
    validation rows, the evaluate settings and the code all match the champion's evaluation."""
    from kubetune.lib import run_keys
    from kubetune import tracking
    from kubetune.stages.register import RegisterConfig, register
    from kubetune.core.train import TrainConfig, run_training

    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    ds, tok_dir = tiny_tickets
    run_training("train-peft", TrainConfig(method="lora", max_steps=1, lora_rank=4, base_model=str(tiny_llama)),
                 tok_dir, tmp_path / "model", tmp_path / "ws")
    name = "reuse-check"
    settings = dict(base_model=str(tiny_llama), model_name=name, max_examples=4, max_new_tokens=4, batch_size=4)
    ev.evaluate(ev.EvaluateConfig(**settings), tmp_path / "model", ds, tok_dir, tmp_path / "eval.json")
    register(RegisterConfig(model_name=name, not_worse_than_base=False), tmp_path / "model", tmp_path / "eval.json")
    downloads = []
    real = tracking.download_version
    monkeypatch.setattr(tracking, "download_version", lambda *a, **k: downloads.append(a) or real(*a, **k))

    def champion_scored_again(**changes) -> bool:
        before = len(downloads)
        report = ev.evaluate(ev.EvaluateConfig(**{**settings, **changes}), tmp_path / "model", ds, tok_dir,
                             tmp_path / "again.json").report
        assert report.champion_version == "1" and report.champion
        return len(downloads) > before

    assert not champion_scored_again()  # everything equal: the recorded numbers
    assert champion_scored_again(max_new_tokens=8)  # other settings
    code_hash = run_keys.code_hash
    monkeypatch.setattr(run_keys, "code_hash", lambda: "other-code")
    assert champion_scored_again()  # other code
    monkeypatch.setattr(run_keys, "code_hash", code_hash)
    assert run_keys.eval_key("val-a", {"x": 1}) != run_keys.eval_key("val-b", {"x": 1})  # other validation rows


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


def test_candidate_and_base_are_compared_example_by_example(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    """The paired difference counts each validation example once for both models: right on 0, 1, 2
    (candidate) against right on 2, 3 (base) is +0.25, better on 2, worse on 1."""
    from test_llm_pyfunc import _trained

    from kubetune.lib.dataset import reference_answer
    from kubetune.ops.runner import format_summary
    from kubetune.stages.evaluate import EvaluateConfig, evaluate

    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    ds, tok = tiny_tickets
    meta, _, val_records = load_dataset_dir(ds)
    refs = [reference_answer(r, meta["shape"]) for r in val_records[:4]]
    right = iter([{0, 1, 2}, {2, 3}])  # candidate first, then the base model

    def answers(model, tok, prompts, max_new_tokens, batch_size):
        ok = next(right)
        return [refs[i] if i in ok else "wrong" for i in range(len(prompts))]

    monkeypatch.setattr(ev, "generate", answers)
    folder = _trained("lora", Path(tiny_llama), tmp_path / "trained")
    cfg = EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4,
                         forgetting=False)
    cand = evaluate(cfg, folder, ds, tok, tmp_path / "eval.json").report.candidate
    assert (cand["exact_match"], cand["exact_match_vs_base"]) == (0.75, 0.25)
    assert (cand["exact_match_better"], cand["exact_match_worse"]) == (2, 1)
    assert cand["exact_match_vs_base_ci_low"] < 0.25 < cand["exact_match_vs_base_ci_high"]
    assert cand["per_example"]["exact_match"] == [1.0, 1.0, 1.0, 0.0]
    text = format_summary({"pipeline": "grpo", "primary_metric": "exact_match", "base": 0.5, "candidate": 0.75,
                           "n": 4, "vs_base": [0.25, -0.55, 1.05, 2, 1], "aliases": []})
    assert "tuned - base, example by example: +0.2500 [95% interval -0.550 to +1.050]; better on 2, worse on 1 of 4" \
        in text
