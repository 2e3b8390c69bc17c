"""Promotion gates, race-safe alias moves, rollback, model cards and skip-when-unchanged.

Against a real MLflow: a fresh SQLite store (``mlflow_uri``) and a real ``mlflow server`` on
loopback (``mlflow_server_env``). Registered versions are made by the ``register`` stage from
small stand-in model folders and evaluation reports (the numbers are what the gates read; the
weights are not), except in the pipeline test, which runs ingest for real through kfp.local.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from kubetune import tracking
from kubetune.cli import main
from kubetune.lib.report import EvalReport
from kubetune.tracking.registry_ops import Gates, check_gates, unchanged
from kubetune.stages.register import RegisterConfig, register
from kubetune.tracking import RunContext

BASE = {"exact_match": 0.10, "val_loss": 2.0, "general_perplexity": 20.0}


@pytest.fixture(params=["sqlite", "server"])
def backend(request, tmp_path, monkeypatch):
    """Both real MLflow backends; a unique model name (the server is shared by the session)."""
    if request.param == "sqlite":
        request.getfixturevalue("mlflow_uri")
    else:
        monkeypatch.chdir(tmp_path)
        request.getfixturevalue("mlflow_server_env")
    return f"reg-{request.param}-{uuid.uuid4().hex[:8]}"


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


# ---------------------------------------------------------------- concurrent promotions

RACER = textwrap.dedent("""
    import json, sys, time
    from kubetune import tracking
    tracking.configure()
    races = json.loads(sys.argv[1])
    tracking.get_alias(races[0][0], "champion")  # warm up: the first registry call opens the store
    print("READY", flush=True)
    t0 = float(sys.stdin.readline())  # the same instant for both processes, sent once both are ready
    out = []
    for name, version, offset in races:
        start = t0 + offset
        while time.time() < start:
            time.sleep(0.001)
        # Both processes decide against the same champion (as two pipeline runs whose evaluate
        # ran at the same time), then both try to move it at the same instant.
        holder = tracking.get_alias(name, "champion")
        while time.time() < start + 0.5:
            time.sleep(0.001)
        moved, why = tracking.move_alias(name, "champion", version, expected_current=str(holder.version))
        out.append({"name": name, "version": version, "moved": moved, "message": why})
    print("RESULT " + json.dumps(out))
""")


def start_together(scripts: list[list[str]]) -> list[subprocess.Popen]:
    """Start one Python process per ``[script, *args]``; once all print READY, send each the same
    start instant (a second ahead) on stdin."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv in scripts]
    for p in procs:
        line = p.stdout.readline()
        assert line.strip() == "READY", (line, p.stderr.read() if p.poll() is not None else "")
    t0 = time.time() + 1.0
    for p in procs:
        p.stdin.write(f"{t0}\n")
        p.stdin.flush()
    return procs


def test_concurrent_promotions_leave_one_champion(backend, tmp_path):
    """Two processes promote different versions at the same instant, twice over:
    each time exactly one wins, the alias holds the winner, the loser is told why."""
    names = [f"{backend}-{i}" for i in range(2)]
    for name in names:
        make_version(tmp_path, name, 0.4)  # v1 champion
        make_version(tmp_path, name, 0.3, champion={"exact_match": 0.4}, champion_version="1")  # v2
        make_version(tmp_path, name, 0.3, champion={"exact_match": 0.4}, champion_version="1")  # v3
    procs = start_together([[RACER, json.dumps([[n, v, 2.0 * i] for i, n in enumerate(names)])] for v in ("2", "3")])
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        results += json.loads(out.split("RESULT ", 1)[1])
    for name in names:
        race = [r for r in results if r["name"] == name]
        winners = [r for r in race if r["moved"]]
        losers = [r for r in race if not r["moved"]]
        assert len(winners) == 1 and len(losers) == 1, race
        assert champion_of(name) == winners[0]["version"]
        assert losers[0]["message"] == (f"'champion' moved to version {winners[0]['version']} while this run "
                                        "was deciding (expected 1)"), race
        assert tracking.alias_history(name, "champion") == ["1", winners[0]["version"]]


LOCKER = textwrap.dedent("""
    import os, sys, time
    from kubetune import tracking
    tracking.configure()
    name, log, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hold = float(sys.argv[4]) if len(sys.argv) > 4 else 0.002
    tracking.get_alias(name, "champion")  # warm up: the first registry call opens the store
    print("READY", flush=True)
    t0 = float(sys.stdin.readline())
    while time.time() < t0:
        time.sleep(0.001)
    for _ in range(rounds):
        with tracking.alias_lock(name, "champion"):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(hold)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\\n")
    print("DONE", flush=True)
""")


def test_alias_lock_under_contention_excludes_and_never_errors(backend, tmp_path):
    """Three processes take and release one alias lock 25 times each, as fast as they can.

    Every take/release window of one process must be disjoint from the others' (the log reads
    in/out pairs of one pid), and no take may fail. A release that lands between another
    process's unique-key clash and MLflow's re-read of the existing lock model makes that
    re-read say "not found"; that is contention, not an error (it failed CI once as the
    concurrent-promotion test's traceback)."""
    name = f"{backend}-lock"
    make_version(tmp_path, name, 0.4)
    log = tmp_path / "lock.log"
    procs = start_together([[LOCKER, name, str(log), "25"]] * 3)
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and "DONE" in out, err[-3000:]
    assert_disjoint(log, 3, 25)
    assert len(set(log.read_text().split()[1::2])) == 3
    assert not versions_of(name + tracking.LOCK_SUFFIX + "champion")


def assert_disjoint(log: Path, holders: int, rounds: int) -> None:
    """Every in/out window in the lock log belongs to one process, none overlaps another."""
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 2 * holders * rounds
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter.startswith("in ") and leave == "out " + enter[3:], (enter, leave, lines)


CRASHER = textwrap.dedent("""
    import os, sys
    from kubetune import tracking
    tracking.configure()
    with tracking.alias_lock(sys.argv[1], "champion"):
        os._exit(9)  # killed while holding the lock: it stays behind
""")


def test_a_lock_left_by_a_killed_holder_is_broken_by_one_waiter(backend, tmp_path, monkeypatch):
    """A holder dies inside the lock; three waiters arrive together. Once the lock is stale,
    exactly one of them breaks it, and the three still enter one at a time."""
    monkeypatch.setenv("KUBETUNE_LOCK_STALE_S", "3")
    name = f"{backend}-stale"
    make_version(tmp_path, name, 0.4)
    crashed = subprocess.run([sys.executable, "-c", CRASHER, name], capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    lock = name + tracking.LOCK_SUFFIX + "champion"
    assert MlflowClient().get_registered_model(lock).tags["kubetune.lock_token"]  # the stale lock is there
    log = tmp_path / "lock.log"
    procs = start_together([[LOCKER, name, str(log), "2", "0.5"]] * 3)
    errs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and "DONE" in out, err[-3000:]
        errs.append(err)
    assert_disjoint(log, 3, 2)
    assert sum(e.count("broke registry lock") for e in errs) == 1, errs
    assert not [m for m in MlflowClient().search_registered_models(f"name LIKE '{lock}%'")]


def test_release_checks_the_holders_token(backend, tmp_path, monkeypatch):
    """A holder deletes the lock only while it carries its own token, and not after holding it
    for half the stale age (a waiter may be breaking it); such a lock is broken when stale."""
    from mlflow.tracking import MlflowClient

    from kubetune.errors import StageError

    monkeypatch.setenv("KUBETUNE_LOCK_STALE_S", "2")
    name = f"{backend}-token"
    lock = name + tracking.LOCK_SUFFIX + "champion"
    client = MlflowClient()
    with pytest.warns(UserWarning, match="another holder's token"):
        with tracking.alias_lock(name, "champion"):
            # Meanwhile the lock was broken and taken by another holder (token "other").
            client.delete_registered_model(lock)
            client.create_registered_model(lock, tags={"kubetune.lock_token": "other"})
    assert client.get_registered_model(lock).tags["kubetune.lock_token"] == "other"  # not deleted
    # Its holder never comes back: a waiter gives up with a one-line error before the lock is stale ...
    t0 = time.monotonic()
    with pytest.raises(StageError, match=f"registry lock {lock} not free after 1 s"):
        with tracking.alias_lock(name, "champion", timeout=1.0):
            pass
    # ... and one that waits longer than the stale age breaks it.
    with pytest.warns(UserWarning, match="broke registry lock"):
        with tracking.alias_lock(name, "champion"):
            assert client.get_registered_model(lock).tags["kubetune.lock_token"] != "other"
    assert time.monotonic() - t0 >= 2.0
    # Held for longer than half the stale age: left for a waiter to break, not deleted.
    with pytest.warns(UserWarning, match="not deleted"):
        with tracking.alias_lock(name, "champion"):
            time.sleep(1.1)
    assert client.get_registered_model(lock)


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


# ---------------------------------------------------------------- skip when nothing changed


def test_pipeline_compiles_with_skip_branch(tmp_path):
    import yaml

    from kubetune.ops.runner import compile_all

    (path,) = compile_all(tmp_path, None, ["peft"])
    spec = yaml.safe_load(path.read_text())
    # The pipeline's own DAG sits inside the exit handler (tests/test_lifecycle.py).
    body = spec["components"][spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    root = spec["components"][body["peft"]["componentRef"]["name"]]["dag"]["tasks"]
    assert "ingest" in root and not any(k in root for k in ("train-peft", "register", "register-skipped"))
    branches = spec["components"][root["condition-branches-1"]["componentRef"]["name"]]["dag"]["tasks"]
    conds = {k: t["triggerPolicy"]["condition"] for k, t in branches.items()}
    changed = next(k for k, c in conds.items() if "== false" in c)
    unchanged = next(k for k, c in conds.items() if k != changed)
    assert "ingest-unchanged" in conds[changed] and "!(" in conds[unchanged]
    assert set(spec["components"][f"comp-{changed}"]["dag"]["tasks"]) >= \
        {"tokenize-data", "train-peft", "evaluate", "register"}
    assert set(spec["components"][f"comp-{unchanged}"]["dag"]["tasks"]) == {"register-skipped"}


def test_unchanged_compares_the_run_key(mlflow_uri, tmp_path):
    name = f"key-{uuid.uuid4().hex[:6]}"
    assert unchanged(name, "k1") == (False, "no champion yet")
    make_version(tmp_path, name, 0.4)
    tracking.set_version_tags(name, "1", {"kubetune.run_key": "k1"})
    same, why = unchanged(name, "k1")
    assert same and why.startswith("skipped: nothing changed") and "v1" in why
    assert unchanged(name, "k1", force=True)[0] is False
    assert unchanged(name, "k2") == (False, "changed: run key k2 (champion v1 was made by k1)")


def test_other_settings_train_and_the_same_run_skips(mlflow_uri, tmp_path, tiny_llama):
    """On the champion's data, a run with other settings trains (as `kubetune run peft --set
    method=dora` after `make run` must); once the champion was made by this very run (same data,
    split, settings and code), the same run is skipped. Each pipeline run's parent ends FINISHED
    and no run is left RUNNING."""
    import mlflow

    from kubetune.ops.runner import format_summary, run_local
    from kubetune.stages.ingest import IngestConfig, check

    data = tmp_path / "tickets.jsonl"
    rows = [{"instruction": f"Classify ticket {i}", "input": f"my router {i} is broken",
             "output": json.dumps({"team": "network", "n": i})} for i in range(24)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    checked = check(IngestConfig(data_uri=str(data)))
    fp = checked.fingerprint
    name = f"skip-{uuid.uuid4().hex[:6]}"
    make_version(tmp_path, name, 0.4, fingerprint=fp)  # the champion: this data, other settings
    params = {"data_uri": str(data), "base_model": str(tiny_llama), "model_name": name, "max_steps": 1,
              "method": "dora", "eval_settings": {"max_examples": 4, "max_new_tokens": 8}}
    # Evaluated on these validation rows with these settings: evaluate takes its recorded numbers
    # (a stand-in's weights could not be scored again).
    from dataclasses import asdict

    from kubetune.lib.run_keys import eval_key
    from kubetune.stages.evaluate import EvaluateConfig

    settings = asdict(EvaluateConfig(base_model=str(tiny_llama), **params["eval_settings"]))
    validation = checked.meta["validation_fingerprint"]
    tracking.set_version_tags(name, "1", {"kubetune.eval_key": eval_key(validation, {
        k: v for k, v in settings.items() if k not in ("model_name", "reuse_base_scores")})})

    trained = run_local("peft", params, workdir=tmp_path)
    assert not trained.get("skipped") and trained["version"] == "2" and champion_of(name) == "1"
    key = tracking.get_version(name, "2").tags["kubetune.run_key"]
    assert key and key != tracking.get_version(name, "1").tags.get("kubetune.run_key")

    tracking.set_version_tags(name, "1", {"kubetune.run_key": key})  # as if v1 had been made by this run
    summary = run_local("peft", params, workdir=tmp_path)
    assert summary["skipped"] is True and summary["promoted"] is False
    assert summary["reason"].startswith("skipped: nothing changed") and summary["version"] == "1"
    assert "skipped" in format_summary(summary)
    assert versions_of(name) == ["2", "1"] and champion_of(name) == "1"
    # Recorded in MLflow: each pipeline run's parent ended; the skipped one has a register child.
    runs = mlflow.search_runs(experiment_names=[f"kubetune/{name}"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kubetune.stage") == "pipeline"
               and r.data.tags.get("kubetune.launch_id")]  # the two `kubetune run`s (not the stand-in's)
    launched = {p.data.tags["kubetune.pipeline_run_id"] for p in parents}
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"
                and r.data.tags.get("kubetune.pipeline_run_id") in launched]
    assert sorted(p.data.tags["kubetune.status"] for p in parents) == ["challenger", "skipped"]
    assert {p.info.status for p in parents} == {"FINISHED"}
    skipped = next(p for p in parents if p.data.tags["kubetune.status"] == "skipped")
    stages = {r.data.tags.get("kubetune.stage") for r in runs
              if r.data.tags.get("kubetune.pipeline_run_id") == skipped.data.tags["kubetune.pipeline_run_id"]}
    assert stages == {"pipeline", "ingest", "register"}
