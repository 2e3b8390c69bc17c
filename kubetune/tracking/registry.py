"""The model registry: versions, their tags, and aliases moved by compare-and-set.

An alias moves only under its lock (:mod:`kubetune.tracking.registry_lock`), and every move is
recorded in the alias's history on the registered model. The gates, model card, promote and
rollback built on these calls are in :mod:`kubetune.tracking.registry_ops`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.errors import ConfigError
from kubetune.tracking.registry_lock import alias_lock


CHAMPION, CHALLENGER = "champion", "challenger"


def get_alias(model_name: str, alias: str):
    """The model version holding ``alias``, or None (no model or no alias yet)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def download_version(model_name: str, version: str, dst: str | Path) -> Path:
    """Download a registered version and return the folder ``train`` wrote (inside an LLM pyfunc)."""
    import mlflow

    from kubetune.serving.llm_pyfunc import trained_folder

    return trained_folder(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}",
                                                              dst_path=str(dst)))


def find_version(model_name: str, tag: str, value: str):
    """The newest version of ``model_name`` whose tag ``tag`` is ``value``, or None."""
    return next((mv for mv in list_versions(model_name) if mv.tags.get(tag) == value), None)


def set_version_tags(model_name: str, version: str, tags: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, str(v))


def move_alias(model_name: str, alias: str, version: str, expected_current: str | None,
               note: str = "") -> tuple[bool, str]:
    """Compare-and-set an alias: move it to ``version`` only if it still points at
    ``expected_current`` (None = no holder). Re-read, check, set, verify, record history.

    The registry has no transactional compare-and-set, so the whole sequence runs under
    ``alias_lock`` (a registered-model name: creating one is atomic in every MLflow backend,
    the database's unique key decides who gets it). Two runs finishing together therefore
    leave exactly one holder, and the loser gets the reason.

    Returns:
        (moved, reason).
    """
    with alias_lock(model_name, alias):
        current = get_alias(model_name, alias)
        current_v = str(current.version) if current else None
        expected_current = str(expected_current) if expected_current is not None else None
        if current_v != expected_current:
            return False, (f"'{alias}' moved to version {current_v} while this run was deciding "
                           f"(expected {expected_current})")
        set_alias(model_name, alias, version, note=note)
        after = get_alias(model_name, alias)
        if after is None or str(after.version) != str(version):
            return False, f"'{alias}' was set concurrently to version {after.version if after else None}"
        return True, f"'{alias}' moved from {current_v} to {version}"


# Where an alias has been: a JSON list of versions on the registered model, newest last.
# Bounded so the tag stays far below MLflow's tag-value limit (5000 characters).
HISTORY_TAG = "kubetune.history.{alias}"
HISTORY_LEN = 100


def alias_history(model_name: str, alias: str) -> list[str]:
    """Versions that held ``alias``, oldest first (the current holder last)."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        rm = MlflowClient().get_registered_model(model_name)
    except MlflowException:
        return []
    raw = rm.tags.get(HISTORY_TAG.format(alias=alias))
    return [str(v) for v in json.loads(raw)] if raw else []


def set_alias(model_name: str, alias: str, version: str, note: str = "", history: list[str] | None = None) -> None:
    """Point ``alias`` at ``version`` and record it (call under ``alias_lock``).

    Args:
        history: The alias history to write; default: the recorded one plus ``version``.
    """
    import json
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if history is None:
        history = alias_history(model_name, alias) + [str(version)]
    client.set_registered_model_alias(model_name, alias, str(version))
    client.set_registered_model_tag(model_name, HISTORY_TAG.format(alias=alias),
                                    json.dumps(history[-HISTORY_LEN:]))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(model_name, str(version), f"kubetune.{alias}_since", stamp)
    if note:
        client.set_model_version_tag(model_name, str(version), f"kubetune.{alias}_note", note)


def filter_string_literal(value: str) -> str:
    """``value`` quoted for an MLflow filter string.

    MLflow's filter parser has no escape inside a quoted string, so the quote character the value
    does not contain is used; a value with both kinds cannot be written as a literal at all.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"model name {value!r}: contains both ' and \", which MLflow's search cannot match")


def list_versions(model_name: str) -> list:
    """Every version of a registered model, newest first ([] when there is no such model)."""
    from mlflow.tracking import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = {filter_string_literal(model_name)}")
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def get_version(model_name: str, version: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version(model_name, str(version))


def set_version_description(model_name: str, version: str, description: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().update_model_version(model_name, str(version), description=description)


def version_aliases(model_name: str) -> dict[str, list[str]]:
    """{version: [aliases]} from the registered model (version searches do not carry aliases)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        rm = MlflowClient().get_registered_model(model_name)
    except MlflowException:
        return {}
    out: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return {v: sorted(a) for v, a in out.items()}
