"""The register stage: it refuses a bad report, registers a version, moves challenger and champion
through the gates, records the decision and the card on the version, and survives a retry or a held lock.

Against a real MLflow on a fresh SQLite store (``mlflow_uri``). Registered versions are made by the
``register`` stage from small stand-in model folders and evaluation reports (the numbers are what the
gates read; the weights are not). The registry's own operations (race-safe alias moves, locks, skip
when unchanged) are tests/test_registry.py's.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from kubetune import tracking
from kubetune.cli import main
from kubetune.errors import StageError
from kubetune.lib.report import EvalReport
from kubetune.stages.register import RegisterConfig, register
from kubetune.tracking import RunContext
from kubetune.tracking.registry_ops import Gates, check_gates
from test_report import _report


BASE = {"exact_match": 0.10, "val_loss": 2.0, "general_perplexity": 20.0}


def make_version(tmp: Path, name: str, em: float, champion: dict | None = None, champion_version=None,
                 forgetting: float | None = 0.02, fingerprint: str = "fp-aaaa", cfg: dict | None = None,
                 run_id: str | None = None):
    """A stand-in trained-model folder + eval.json, registered through the register stage
    (each call another pipeline run unless ``run_id`` says otherwise)."""
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    d = tmp / f"v-{uuid.uuid4().hex[:6]}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    manifest = {"method": "lora", "base_model": "tiny-llama", "data_fingerprint": fingerprint, "shape": "chat",
                "train": {"method": "lora", "max_steps": 60, "learning_rate": 2e-4, "lora_rank": 16},
                "counts": {"train": 180}}
    (d / "model" / "kubetune_method.json").write_text(json.dumps(manifest))
    report = {"evaluated": True, "primary_metric": "exact_match", "higher_is_better": True, "min_improvement": 0.0,
              "candidate": {"exact_match": em, "val_loss": 1.5, "general_perplexity": 20.0 * (1 + (forgetting or 0))},
              "base": BASE, "champion": champion, "champion_version": champion_version,
              "forgetting": forgetting, "beats_base": em > BASE["exact_match"],
              "beats_champion": champion is None or em > champion["exact_match"], "data_fingerprint": fingerprint,
              "validation_examples": 20}
    if forgetting is None:
        del report["candidate"]["general_perplexity"]
    (d / "eval.json").write_text(json.dumps(report))
    return register(RegisterConfig(model_name=name, **(cfg or {})), d / "model", d / "eval.json",
                    ctx=RunContext(name, run_id, "peft"))


def champion_of(name: str) -> str | None:
    mv = tracking.get_alias(name, tracking.CHAMPION)
    return str(mv.version) if mv else None


def versions_of(name: str) -> list[str]:
    return [str(v.version) for v in tracking.list_versions(name)]


# ---------------------------------------------------------------- gates


def gate(metric, candidate, base, champion, champion_version, forgetting, gates, base_name=None):
    """check_gates on a report with these numbers."""
    return check_gates(EvalReport(metric, candidate, base=base, champion=champion, champion_version=champion_version,
                                  forgetting=forgetting, base_name=base_name), gates)


def test_check_gates_pure():
    g = Gates(min_improvement=0.05, max_forgetting=0.1)
    ok = gate("exact_match", {"exact_match": 0.6}, BASE, {"exact_match": 0.5}, "3", 0.05, g)
    assert ok.promote and ok.checks["champion"].startswith("pass")
    close = gate("exact_match", {"exact_match": 0.54}, BASE, {"exact_match": 0.5}, "3", 0.05, g)
    assert not close.promote and "does not beat champion v3" in close.reason
    forgot = gate("exact_match", {"exact_match": 0.9}, BASE, {"exact_match": 0.5}, "3", 0.25, g)
    assert not forgot.promote and forgot.reason.startswith("forgetting +25.0% exceeds")
    incomplete = gate("exact_match", {"exact_match": 0.9}, BASE, None, None, None, g)
    assert not incomplete.promote and "not measured" in incomplete.reason
    lenient = gate("exact_match", {"exact_match": 0.9}, BASE, None, None, None,
                   Gates(max_forgetting=-1, require_complete=False))
    assert lenient.promote
    lower = gate("val_loss", {"val_loss": 1.0}, BASE, {"val_loss": 1.2}, "1", None, Gates(0.1))
    assert lower.promote and "beats champion v1" in lower.reason


def test_a_first_run_worse_than_the_base_model_does_not_become_champion():
    base = {"accuracy": 0.2333, "val_loss": 1.0}
    worse = gate("accuracy", {"accuracy": 0.1667}, base, None, None, None, Gates())
    assert not worse.promote and "worse than the base model's (0.2333)" in worse.reason
    assert worse.checks["champion"] == "pass: no champion yet" and worse.checks["base"].startswith("fail")
    # A first version must beat the base, not tie it (one step spent in warm-up changes nothing) ...
    tie = gate("accuracy", {"accuracy": 0.2333}, base, None, None, None, Gates())
    assert not tie.promote and tie.reason == "accuracy 0.2333 does not beat the base model's (0.2333); a first " \
                                             "version must"
    assert not gate("val_loss", {"val_loss": 1.0}, base, None, None, None, Gates()).promote
    assert gate("val_loss", {"val_loss": 0.99}, base, None, None, None, Gates()).promote
    # A Mixture-of-Agents trains nothing: tying its best single proposer (its "base") is enough.
    assert gate("accuracy", {"accuracy": 0.2333}, base, None, None, None, Gates(), base_name="proposer-a").promote
    # ... a later one must beat the champion (strictly) and not be worse than the base.
    later = gate("accuracy", {"accuracy": 0.2333}, base, {"accuracy": 0.2}, "1", None, Gates())
    assert later.promote and later.checks["base"].startswith("pass")
    assert not gate("val_loss", {"val_loss": 1.1}, base, None, None, None, Gates()).promote
    off = gate("accuracy", {"accuracy": 0.1667}, base, None, None, None, Gates(not_worse_than_base=False))
    assert off.promote and off.checks["base"] == "pass: gate off"


def test_gates_accept_reject_card_promote_rollback(mlflow_uri, tmp_path, capsys):
    """On SQLite (the server's turn is the concurrency test: ~30 registry calls per version
    through HTTP cost minutes on a busy CI machine)."""
    name = f"reg-{uuid.uuid4().hex[:8]}"
    v1 = make_version(tmp_path, name, 0.40, run_id="run-a")
    assert v1.promoted and v1.aliases == ["challenger", "champion"] and champion_of(name) == "1"

    # Reject: worse than the champion -> challenger only, numbers recorded on the version.
    v2 = make_version(tmp_path, name, 0.30, champion={"exact_match": 0.40}, champion_version="1")
    assert not v2.promoted and champion_of(name) == "1"
    assert str(tracking.get_alias(name, tracking.CHALLENGER).version) == "2"
    t2 = tracking.get_version(name, "2").tags
    assert t2["kubetune.decision"] == "challenger"
    assert t2["gate.champion"].startswith("fail: exact_match 0.3000 does not beat champion v1 (0.4000)")
    assert float(t2["eval.exact_match"]) == 0.30 and float(t2["champion.exact_match"]) == 0.40
    assert float(t2["base.exact_match"]) == 0.10 and t2["kubetune.champion_compared"] == "1"

    # Reject: better, but not by register's margin; and better but forgetting too much.
    v3 = make_version(tmp_path, name, 0.42, champion={"exact_match": 0.40}, champion_version="1",
                      cfg={"min_improvement": 0.05})
    assert not v3.promoted and "by the margin 0.05" in v3.reason
    v4 = make_version(tmp_path, name, 0.90, champion={"exact_match": 0.40}, champion_version="1", forgetting=0.30,
                      cfg={"max_forgetting": 0.1})
    assert not v4.promoted and v4.reason == "forgetting +30.0% exceeds the gate 10.0%"
    assert tracking.get_version(name, "4").tags["gate.max_forgetting"] == "0.1"

    # Accept: beats the champion by the margin within the forgetting bound.
    v5 = make_version(tmp_path, name, 0.60, champion={"exact_match": 0.40}, champion_version="1",
                      cfg={"min_improvement": 0.05, "max_forgetting": 0.1}, run_id="run-b")
    assert v5.promoted and champion_of(name) == "5"
    assert v5.reason == "exact_match 0.6000 beats champion v1 (0.4000) by the margin 0.05"

    # The card: among the version's files and as its description, with the right numbers.
    mv5 = tracking.get_version(name, "5")
    card = (tracking.download_version(name, "5", tmp_path / "dl") / "README.md").read_text()
    for text in (card, mv5.description):
        assert "| exact_match (primary) | 0.6000 | 0.1000 | +0.5000 | 0.4000 | +0.2000 |" in text
        assert "Forgetting (general-text perplexity vs base): +2.0%" in text
        assert "`fp-aaaa`" in text and "180 training rows" in text and "`learning_rate`: 0.0002" in text
        assert "pipeline run `run-b`" in text and "Intended use" in text
    assert "Decision: **champion**" in mv5.description
    assert mv5.run_id and tracking.get_run(mv5.run_id).data.tags["kubetune.pipeline_run_id"] == "run-b"
    assert tracking.get_run(mv5.run_id).data.tags["kubetune.decision"] == "promoted"

    # promote by hand, same gates: v2 is worse than champion v5 -> refused, nothing moves.
    assert main(["promote", name, "2"]) == 1
    assert "refused: exact_match 0.3000 does not beat champion v5" in capsys.readouterr().err
    assert champion_of(name) == "5"
    # --force moves it and says so on the version.
    assert main(["promote", name, "3", "--force"]) == 0
    assert champion_of(name) == "3"
    t3 = tracking.get_version(name, "3").tags
    assert t3["kubetune.decision"] == "forced" and t3["kubetune.promoted_by"] == "kubetune promote --force"
    assert tracking.alias_history(name, "champion") == ["1", "5", "3"]

    # Rollback after two promotions (5 then 3): back to 5, then back to 1, then nothing left.
    assert main(["rollback", name]) == 0 and champion_of(name) == "5"
    assert tracking.get_version(name, "3").tags["kubetune.rolled_back"] == "champion returned to v5"
    assert main(["rollback", name]) == 0 and champion_of(name) == "1"
    assert main(["rollback", name]) == 1 and champion_of(name) == "1"
    capsys.readouterr()

    assert main(["models", name]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "metric", "value"]
    row = {ln.split()[0]: ln for ln in lines[1:6]}
    assert set(row) == {"v1", "v2", "v3", "v4", "v5"}
    assert "champion" in row["v1"] and "challenger" in row["v5"] and "0.6000" in row["v5"]
    assert "forced (rolled back)" in row["v3"] and "+30.0%" in row["v4"]
    assert "champion history (oldest first): v1" in table
    # No lock models left behind by the alias moves.
    assert not [v for v in versions_of(name + tracking.LOCK_SUFFIX + "champion")]


def test_a_failed_benchmark_gate_keeps_the_champion(tmp_path):
    from kubetune.lib.report import EvalReport
    from kubetune.stages.register import RegisterConfig, decide

    report = EvalReport("exact_match", {"exact_match": 0.9}, base={"exact_match": 0.1})
    assert decide(report, RegisterConfig(model_name="m"))[0]
    report.benchmark_gate = "fail: kubetune_arithmetic 0.3000 is 0.2000 below the base's 0.5000 (allowed drop 0.02)"
    promote, reason = decide(report, RegisterConfig(model_name="m"))
    assert not promote and reason.startswith("kubetune_arithmetic 0.3000 is 0.2000 below")


# ---------------------------------------------------------------- refusals, retries and held locks


def test_register_refuses_with_the_reports_message_and_registers_nothing(tmp_path, mlflow_uri):
    model = tmp_path / "model"
    model.mkdir()
    (model / "kubetune_method.json").write_text("{}")
    data = _report().to_dict()
    data["candidate"] = {"val_loss": 1.0}
    (tmp_path / "eval.json").write_text(json.dumps(data))
    with pytest.raises(StageError) as e:
        register(RegisterConfig(model_name="refused"), model, tmp_path / "eval.json")
    assert str(e.value).startswith("register: evaluation report ") and str(e.value).endswith("; refusing to register")
    assert "'candidate' has no primary metric 'exact_match'" in str(e.value)
    tracking.configure()
    assert tracking.list_versions("refused") == []


def test_register_run_twice_finds_its_own_version(mlflow_uri, tmp_path):
    """A retried register task (same pipeline run) makes no second version; it restores what the
    first attempt did not finish (here: the aliases)."""
    name = f"reg-{uuid.uuid4().hex[:8]}"
    first = make_version(tmp_path, name, 0.4, run_id="kfp-run-1")
    assert first.promoted and versions_of(name) == ["1"]
    from mlflow.tracking import MlflowClient

    for alias in ("champion", "challenger"):  # as if the first attempt died after creating the version
        MlflowClient().delete_registered_model_alias(name, alias)
    again = make_version(tmp_path, name, 0.4, run_id="kfp-run-1")
    assert versions_of(name) == ["1"] and again.version == "1" and again.promoted
    assert champion_of(name) == "1" and str(tracking.get_alias(name, "challenger").version) == "1"
    assert tracking.get_version(name, "1").tags["kubetune.registered_by"] == "kfp-run-1/peft"
    other = make_version(tmp_path, name, 0.3, champion={"exact_match": 0.4}, champion_version="1", run_id="kfp-run-2")
    assert other.version == "2" and versions_of(name) == ["2", "1"]


def test_register_decides_before_creating_and_fails_cleanly_on_a_held_lock(mlflow_uri, tmp_path, monkeypatch):
    """A lock that is not freed in time fails register with a one-line StageError before any
    version exists; a lock left by a killed holder is broken within the wait, and register goes on."""
    from mlflow.tracking import MlflowClient

    from kubetune.errors import StageError

    name = f"reg-{uuid.uuid4().hex[:8]}"
    lock = name + tracking.LOCK_SUFFIX + "champion"
    MlflowClient().create_registered_model(lock, tags={"kubetune.lock_token": "killed-holder"})
    monkeypatch.setenv("KUBETUNE_LOCK_STALE_S", "60")
    monkeypatch.setenv("KUBETUNE_LOCK_WAIT_S", "1")
    with pytest.raises(StageError, match="not free after 1 s .*nothing was registered"):
        make_version(tmp_path, name, 0.4)
    assert versions_of(name) == [] and tracking.get_alias(name, "challenger") is None
    monkeypatch.setenv("KUBETUNE_LOCK_STALE_S", "1")
    monkeypatch.delenv("KUBETUNE_LOCK_WAIT_S")  # the default wait is longer than the stale age
    with pytest.warns(UserWarning, match="broke registry lock"):
        v1 = make_version(tmp_path, name, 0.4)
    assert v1.promoted and versions_of(name) == ["1"]
    tags = tracking.get_version(name, "1").tags
    assert tags["kubetune.decision"] == "promoted" and tags["gate.champion"] == "pass: no champion yet"
