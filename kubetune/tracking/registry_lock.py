"""The registry lock of one alias: one holder at a time, across processes and machines, after crashes too.

MLflow's registry has no conditional update, so moving an alias (re-read, check, set, verify)
runs under this lock. Two ways to hold it, one contract (``alias_lock(model, alias)``):

- **PostgreSQL tracking store** (``MLFLOW_TRACKING_URI=postgresql://...``): a session advisory
  lock (``pg_try_advisory_lock``) on a connection of its own. The database releases it when
  the holder's connection ends, so a killed holder leaves nothing behind. Through an MLflow
  *server* the client cannot see the server's backend store, so it falls back to:
- **Anything else** (an MLflow server over HTTP, SQLite): a registered model named
  ``<model>.kubetune-lock-<alias>``. Creating a registered model is the one atomic
  compare-and-set every MLflow backend offers (the database's unique key on the name). The
  lock is created with a random token (tag ``kubetune.lock_token``); its holder releases it only
  while the token is its own.

A lock left by a killed holder is broken once a waiter has seen the *same token* for
``stale_s()`` seconds on its own clock (no comparison of clocks between machines). Breaking is
itself single-winner: the breaker must first create ``<lock>.break-<token>``, which only one
waiter can, and deletes the lock only if it still carries that token. Since tokens are never
reused, a waiter that saw the old token late finds another token and breaks nothing. A holder
that held the lock for half the stale age or more does not delete it at release (a waiter may
be breaking it at that moment); it stays for a waiter to break. Waits are bounded: longer than
the stale age, then a ``StageError`` naming the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
import uuid
import warnings
from typing import Any, Iterator

from kubetune.errors import StageError
from kubetune.tracking.server import already_exists, has_error_code, tracking_uri

LOCK_SUFFIX = ".kubetune-lock-"
TOKEN_TAG = "kubetune.lock_token"
# A lock whose token a waiter has seen unchanged for this long was left by a process that died
# between take and release (a holder keeps it for about a second: re-read, check, set, verify).
LOCK_STALE_S = 120.0


def stale_s() -> float:
    """Seconds of an unchanged token after which a waiter breaks the lock (``KUBETUNE_LOCK_STALE_S``)."""
    return float(os.environ.get("KUBETUNE_LOCK_STALE_S") or LOCK_STALE_S)


def wait_s() -> float:
    """How long a waiter waits before giving up (``KUBETUNE_LOCK_WAIT_S``); by default twice the
    stale age and half a minute, so that a lock left by a killed holder is broken before the
    wait ends."""
    return float(os.environ.get("KUBETUNE_LOCK_WAIT_S") or 2 * stale_s() + 30.0)


def lock_name(model_name: str, alias: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}{alias}"


def is_postgres(uri: str) -> bool:
    return uri.startswith(("postgresql:", "postgresql+", "postgres:"))


@contextlib.contextmanager
def alias_lock(model_name: str, alias: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the registry-wide lock of one alias of ``model_name``.

    Args:
        model_name: Registered model name.
        alias: The alias the lock guards (``champion``, ``challenger``).
        timeout: Seconds to wait for it (default ``wait_s()``, longer than the stale age).

    Raises:
        StageError: the lock was not free within ``timeout``.
    """
    timeout = wait_s() if timeout is None else timeout
    uri = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()
    lock = _pg_lock if is_postgres(uri) else _model_lock
    with lock(uri, lock_name(model_name, alias), timeout):
        yield


# ---------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def _pg_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)  # bigint key
    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    deadline = time.monotonic() + timeout
    try:
        with engine.connect() as conn:
            while not conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()  # end the implicit transaction between tries
                if time.monotonic() > deadline:
                    raise _timeout(name, timeout, "a PostgreSQL advisory lock (freed when its holder's "
                                                  "connection ends)")
                time.sleep(0.05 + random.random() * 0.2)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


# ---------------------------------------------------------------- a registered model as the lock


@contextlib.contextmanager
def _model_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    seen, seen_since = None, 0.0  # the holder's token as this waiter last saw it, and since when
    while True:
        try:
            client.create_registered_model(name, tags={TOKEN_TAG: token},
                                           description="kubetune lock: held for a second while an alias moves")
            break
        except MlflowException as e:
            if not _contended(e):
                raise
        held = _token_of(client, name)
        now = time.monotonic()
        if held != seen:
            seen, seen_since = held, now
        elif held is not None and now - seen_since >= stale_s() and _break(client, name, held):
            continue  # broken: take it at once
        if now > deadline:
            raise _timeout(name, timeout, f"held with token {held} for at least {now - seen_since:.0f} s; "
                                          f"one left by a killed holder is broken after {stale_s():.0f} s")
        time.sleep(0.05 + random.random() * 0.2)
    acquired = time.monotonic()
    try:
        yield
    finally:
        _release(client, name, token, time.monotonic() - acquired)


def _token_of(client: Any, name: str) -> str | None:
    """The lock's token, or None when there is no lock (or it cannot be read right now)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name).tags.get(TOKEN_TAG, "")
    except MlflowException:
        return None


def _break(client: Any, name: str, token: str) -> bool:
    """Delete the lock carrying ``token``, if this waiter wins the right to (one waiter does)."""
    from mlflow.exceptions import MlflowException

    marker = f"{name}.break-{token}"
    try:
        client.create_registered_model(marker, description="kubetune: breaking a stale lock")
    except MlflowException as e:
        if not _contended(e):
            raise
        return False  # another waiter breaks it
    try:
        if _token_of(client, name) != token:
            return False  # already broken and taken again: not ours to delete
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(name)
        warnings.warn(f"broke registry lock {name}: its token {token} was unchanged for {stale_s():.0f} s "
                      "(a holder killed between take and release)", stacklevel=3)
        return True
    finally:
        _delete(client, marker)


def _release(client: Any, name: str, token: str, held_s: float) -> None:
    if held_s >= stale_s() / 2:
        warnings.warn(f"registry lock {name} was held for {held_s:.0f} s; not deleted (a waiter may be breaking "
                      f"it); it is broken after {stale_s():.0f} s", stacklevel=3)
        return
    for i in range(20):
        current = _token_of(client, name)
        if current == token:
            if _delete(client, name):
                return
        elif current is not None:
            warnings.warn(f"registry lock {name} carries another holder's token at release; left alone",
                          stacklevel=3)
            return
        else:
            # None: gone, or the read failed (SQLite busy). Gone is done; a failed read is retried.
            try:
                client.get_registered_model(name)
            except Exception as e:  # noqa: BLE001 - only 'does not exist' ends the loop
                if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    return
        time.sleep(0.05 * (i + 1))
    warnings.warn(f"could not release registry lock {name}; it is broken after {stale_s():.0f} s", stacklevel=3)


def _delete(client: Any, name: str, attempts: int = 20) -> bool:
    """Delete a registered model, retried (a busy SQLite writer); True once it is gone."""
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            client.delete_registered_model(name)
            return True
        except MlflowException as e:
            if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                return True
            time.sleep(0.05 * (i + 1))
    return False


def _contended(e: Exception) -> bool:
    """Whether a failed create means "someone else holds it" (wait) rather than a real error.

    Three answers mean contention: RESOURCE_ALREADY_EXISTS; "database is locked" (SQLite's
    writer lock); and RESOURCE_DOES_NOT_EXIST. The last is MLflow's SQL store on a unique-key
    clash: it re-reads the existing model to word its error (sqlalchemy_store.create_registered_model,
    mlflow 3.17), and when the holder released the lock between the clash and that read, the
    read fails with "not found" (seen in CI on SQLite).
    """
    return already_exists(e) or has_error_code(e, "RESOURCE_DOES_NOT_EXIST") or "locked" in str(e).lower()


def _timeout(name: str, timeout: float, detail: str) -> StageError:
    return StageError(f"registry lock {name} not free after {timeout:.0f} s ({detail}); nothing was registered "
                      "or moved. If no kubetune run is registering into this model, delete the registered model "
                      f"'{name}' in MLflow and rerun")
