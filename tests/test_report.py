"""The evaluation report (eval.json): round trip, the verdict, refusals that name the field, atomic save.

Plus the import rule the scoring move exists for: nothing outside cli/components/stages reaches
into ``kubetune.stages`` for scoring, and no stage imports ``stages.evaluate``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from kubetune import tracking
from kubetune.errors import StageError
from kubetune.lib.report import EvalReport, better, lower_is_better

ROOT = Path(__file__).resolve().parent.parent


def _report(**kw) -> EvalReport:
    values = dict(primary_metric="exact_match",
                  candidate={"exact_match": 0.6, "val_loss": 1.2, "n": 48, "samples": [{"prompt": "p"}]},
                  base={"exact_match": 0.1, "val_loss": 2.0}, champion={"exact_match": 0.5}, champion_version="3",
                  min_improvement=0.05, forgetting=0.02, forgetting_ci_low=0.01, forgetting_ci_high=0.03,
                  forgetting_lines=24, data_fingerprint="fp-1", validation_fingerprint="vfp-1", eval_key="k",
                  validation_examples=48, benchmark_gate="pass: gate off")
    values.update(kw)
    return EvalReport(**values)


# ---------------------------------------------------------------- round trip


def test_save_then_load_gives_the_same_report_and_the_keys_readers_use(tmp_path):
    report = _report(details={"mode": "weighted", "rows": [{"name": "a", "accuracy": 0.5}]})
    path = report.save(tmp_path / "out" / "eval.json")
    assert EvalReport.load(path) == report
    on_disk = json.loads(path.read_text())
    # the flat object jq, the KFP UI and older readers see: fields, verdict, then the method's extras
    assert on_disk["beats_base"] is True and on_disk["beats_champion"] is True and on_disk["higher_is_better"]
    assert on_disk["mode"] == "weighted" and on_disk["rows"][0]["name"] == "a" and "details" not in on_disk
    assert on_disk["candidate"]["samples"] == [{"prompt": "p"}]


def test_an_integer_champion_version_is_read_as_a_string(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**_report().to_dict(), "champion_version": 7}))
    assert EvalReport.load(path).champion_version == "7"
    assert _report(champion_version=7).champion_version == "7"


def test_a_stored_verdict_is_recomputed_not_trusted(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**_report().to_dict(), "beats_champion": False}))
    assert EvalReport.load(path).judge().beats_champion


# ---------------------------------------------------------------- the verdict


def test_direction_of_each_metric():
    for metric in ("val_loss", "val_perplexity", "general_perplexity", "eval_loss"):
        assert lower_is_better(metric), metric
    for metric in ("exact_match", "rouge_l", "field_accuracy", "accuracy", "macro_f1", "reward", "win_rate",
                   "pattern_rate", "bench_kubetune_arithmetic"):
        assert not lower_is_better(metric), metric


def test_judge_higher_is_better_with_margin_and_ties():
    assert _report().judge().beats_base and _report().judge().beats_champion  # 0.6 vs 0.1 / 0.5, margin 0.05
    close = _report(candidate={"exact_match": 0.54}).judge()  # beats the champion, but not by the margin
    assert close.beats_base and not close.beats_champion
    tie = _report(candidate={"exact_match": 0.5}, min_improvement=0.0).judge()
    assert not tie.beats_champion  # a tie never beats
    assert not _report(candidate={"exact_match": 0.1}, min_improvement=0.0).judge().beats_base
    worse = _report(candidate={"exact_match": 0.05}).judge()
    assert not worse.beats_base and not worse.beats_champion and worse.higher_is_better


def test_judge_lower_is_better():
    kw = dict(primary_metric="val_loss", base={"val_loss": 2.0}, champion={"val_loss": 1.5}, min_improvement=0.1)
    won = _report(candidate={"val_loss": 1.3}, **kw).judge()
    assert won.beats_base and won.beats_champion and not won.higher_is_better
    near = _report(candidate={"val_loss": 1.45}, **kw).judge()  # lower, but by less than the margin
    assert near.beats_base and not near.beats_champion
    assert not _report(candidate={"val_loss": 1.5}, **{**kw, "min_improvement": 0.0}).judge().beats_champion
    higher = _report(candidate={"val_loss": 2.5}, **kw).judge()  # a larger loss is worse
    assert not higher.beats_base and not higher.beats_champion
    assert better(1.0, 1.2, "val_loss", 0.1) and not better(1.2, 1.0, "val_loss", 0.0)
    assert better(0.7, 0.5, "accuracy", 0.1) and not better(0.5, 0.7, "accuracy", 0.0)


def test_judge_without_a_champion_or_base_numbers():
    first = _report(champion=None, champion_version=None).judge()
    assert first.beats_champion  # nothing to beat
    assert not _report(base=None).judge().beats_base
    assert not _report(champion={"val_loss": 1.0}).judge().beats_champion  # no primary metric to compare


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("change,words", [
    (lambda d: d.pop("primary_metric"), "has no 'primary_metric'"),
    (lambda d: d.pop("candidate"), "has no 'candidate'"),
    (lambda d: d.update(candidate=[0.6]), "field 'candidate' must be an object, got list"),
    (lambda d: d.update(base="0.1"), "field 'base' must be an object or null, got str"),
    (lambda d: d.update(min_improvement="a lot"), "field 'min_improvement' must be a number, got str"),
    (lambda d: d.update(forgetting=True), "field 'forgetting' must be a number or null, got bool"),
    (lambda d: d.update(validation_examples=4.5), "field 'validation_examples' must be an integer, got float"),
    (lambda d: d.update(evaluated="yes"), "field 'evaluated' must be true or false, got str"),
    (lambda d: d["candidate"].update(exact_match="0.6"), "field 'candidate.exact_match' must be a number"),
    (lambda d: d["champion"].update(exact_match=None), "field 'champion.exact_match' must be a number"),
    (lambda d: d.update(evaluated=False), "is incomplete: field 'evaluated' is false"),
    (lambda d: d["candidate"].pop("exact_match"), "is incomplete: field 'candidate' has no primary metric"),
])
def test_load_refuses_a_bad_report_naming_the_file_and_field(tmp_path, change, words):
    data = json.loads(json.dumps(_report().to_dict()))
    change(data)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StageError) as e:
        EvalReport.load(path)
    message = str(e.value)
    assert words in message and str(path) in message and "\n" not in message


def test_load_refuses_a_missing_or_unparsable_file(tmp_path):
    with pytest.raises(StageError, match=f"no evaluation report at {tmp_path / 'eval.json'}"):
        EvalReport.load(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text('{"primary_metric": "exact_match",\n "candidate": }')
    with pytest.raises(StageError, match=r"eval.json is not valid JSON \(line 2, column 15"):
        EvalReport.load(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text("[1, 2]")
    with pytest.raises(StageError, match="must be a JSON object, got list"):
        EvalReport.load(tmp_path / "eval.json")


def test_details_may_not_shadow_the_reports_own_keys():
    with pytest.raises(ValueError, match="beats_base"):
        _report(details={"beats_base": False})


# ---------------------------------------------------------------- atomic save


def test_a_report_that_cannot_be_serialised_leaves_the_old_file_and_no_temporary(tmp_path):
    path = _report().save(tmp_path / "eval.json")
    before = path.read_text()
    with pytest.raises(TypeError):
        _report(candidate={"exact_match": 0.9, "model": object()}).save(path)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    with pytest.raises(TypeError):
        _report(details={"when": object()}).save(tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    path = _report().save(tmp_path / "eval.json")
    before = path.read_text()

    def refuse(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        _report(forgetting=0.5).save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


# ---------------------------------------------------------------- tracking


def test_log_then_read_back_from_the_run(mlflow_uri):
    import mlflow

    tracking.configure()
    report = _report()
    with mlflow.start_run() as run:
        report.log(tracking)
    logged = tracking.get_run(run.info.run_id).data
    assert logged.tags["kubetune.primary_metric"] == "exact_match"
    assert logged.metrics["candidate_exact_match"] == 0.6 and logged.metrics["champion_exact_match"] == 0.5
    assert logged.metrics["forgetting_ci_high"] == 0.03 and "candidate_samples" not in logged.metrics
    back = EvalReport.from_logged(logged.metrics, logged.tags["kubetune.primary_metric"])
    assert back.candidate == {"exact_match": 0.6, "val_loss": 1.2, "n": 48}
    assert back.base == report.base and back.forgetting == 0.02 and back.judge() == report.judge()


# ---------------------------------------------------------------- imports


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_scoring_and_the_report_import_no_stage():
    """The scoring functions and the report live below the stages: no stage imports
    ``stages.evaluate`` and nothing outside stages/cli/components imports a stage for them."""
    offenders = []
    for path in sorted((ROOT / "kubetune").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        names = _imports(path)
        if rel.startswith("kubetune/stages/") and rel != "kubetune/stages/evaluate.py":
            offenders += [f"{rel}: {n}" for n in names if n.startswith("kubetune.stages.evaluate")
                          and not n.startswith(("kubetune.stages.evaluate_",))]
        if rel.startswith("kubetune/lib/"):
            offenders += [f"{rel}: {n}" for n in names if n.startswith("kubetune.")
                          and not n.startswith(("kubetune.lib", "kubetune.errors"))]
        if rel.startswith(("kubetune/lib/", "kubetune/core/", "kubetune/methods/", "kubetune/serving/",
                           "kubetune/tracking/", "kubetune/tools/")):
            offenders += [f"{rel}: {n}" for n in names if n.startswith("kubetune.stages.evaluate")]
    assert offenders == []
