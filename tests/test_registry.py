"""The registry's operations: race-safe alias moves, registry locks and skip-when-unchanged.
The register stage (gates, challenger/champion, card, promote and rollback after it) is
tests/test_register.py's, whose ``make_version`` makes the versions used here.

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
from kubetune.tracking.registry_ops import unchanged
from test_register import champion_of, make_version, versions_of



@pytest.fixture(params=["sqlite", "server"])
def backend(request, tmp_path, monkeypatch):
    """Both real MLflow backends; a unique model name (the server is shared by the session)."""
    if request.param == "sqlite":
        request.getfixturevalue("mlflow_uri")
    else:
        monkeypatch.chdir(tmp_path)
        request.getfixturevalue("mlflow_server_env")
    return f"reg-{request.param}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- gates


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
