"""Golden compiled YAML: each pipeline, compiled with a GPU profile, equals tests/golden/<name>.yaml.

Regenerate every golden file after an intended change (a stage's interface or docstring, the
DAG, placement), then read the diff before committing it:

    KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

The compiled spec is the contract KFP runs: which tasks exist, under which conditions, what
each receives, and the resources, tolerations, volumes, secrets and environment of its pod. A
change to any of them shows here as a diff, whatever else the tests check. Normalised away,
since they change without the pipeline changing: the KFP SDK version (``sdkVersion`` and the
executors' bootstrap ``pip install kfp==...``), the source commit stamped into each task
(``KUBETUNE_GIT_COMMIT``; absent outside a git checkout) and the image tags (the package
version, or ``KUBETUNE_IMAGE``/``KUBETUNE_CPU_IMAGE`` overrides), written as
``<TRAIN_IMAGE>``/``<CPU_IMAGE>`` so which image a step runs still counts. The compiler's
header comment (parameter defaults in no stable order) is dropped: the file is the parsed
spec, keys sorted, long strings (component sources) as literal blocks.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import pytest
import yaml

from kubetune.ops import kube
from kubetune.ops.image import CPU_IMAGE, TRAIN_IMAGE
from kubetune.ops.runner import compile_all
from kubetune.pipelines import PIPELINES

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
PROFILE = REPO / "profiles" / "h200x2.yaml"
UPDATE = os.environ.get("KUBETUNE_UPDATE_GOLDEN", "").lower() in ("1", "true", "yes")
REGENERATE = "KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py"
SHOWN = 80  # diff lines in a failure message; the rest is counted


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value: str):
    # Component sources and scripts as blocks of lines, so a diff shows the line that changed.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _normalise(node):
    if isinstance(node, dict):
        if node.get("name") == kube.GIT_COMMIT_ENV and set(node) == {"name", "value"}:
            return None
        return {k: _normalise(v) for k, v in node.items()}
    if isinstance(node, list):
        return [n for n in (_normalise(v) for v in node) if n is not None]
    if isinstance(node, str):
        node = node.replace(TRAIN_IMAGE, "<TRAIN_IMAGE>").replace(CPU_IMAGE, "<CPU_IMAGE>")
        node = re.sub(r"'kfp==[\w.]+'", "'kfp==<SDK>'", node)  # the executor's bootstrap install
        return re.sub(r"^kfp-\d[\w.]*$", "kfp", node)
    return node


def normalised(compiled: str) -> str:
    """The compiled YAML (pipeline spec, then platform spec) without its volatile fields."""
    docs = [_normalise(doc) for doc in yaml.safe_load_all(compiled)]
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=True, width=120, allow_unicode=True)


def _first_path(a, b, path: str) -> str:
    """Where two parsed specs first differ, as a dotted path (sorted keys, list indices)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b or a[key] != b[key]:
                return _first_path(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_path(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path}[{min(len(a), len(b))}]"
    return path


def first_differences(expected: str, actual: str, name: str) -> str:
    """Where the first difference is (a path in the spec), then the unified diff's first lines."""
    docs = ("pipeline-spec", "platform-spec")
    old, new = list(yaml.safe_load_all(expected)), list(yaml.safe_load_all(actual))
    where = next((_first_path(a, b, docs[i]) for i, (a, b) in enumerate(zip(old, new)) if a != b),
                 f"number of YAML documents: {len(old)} -> {len(new)}")
    diff = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), f"tests/golden/{name}.yaml",
                                     f"compiled {name}", lineterm="", n=3))
    more = f"\n... {len(diff) - SHOWN} more diff lines" if len(diff) > SHOWN else ""
    return f"first difference at {where}\n" + "\n".join(diff[:SHOWN]) + more


def test_every_pipeline_has_a_golden_file():
    assert UPDATE or {p.stem for p in GOLDEN.glob("*.yaml")} == set(PIPELINES), f"regenerate: {REGENERATE}"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_compiled_pipeline_matches_its_golden_file(name, tmp_path):
    (path,) = compile_all(tmp_path, str(PROFILE), [name])
    actual = normalised(path.read_text())
    golden = GOLDEN / f"{name}.yaml"
    if UPDATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(actual)
        return
    assert golden.exists(), f"no golden file {golden.relative_to(REPO)}; create it: {REGENERATE}"
    expected = golden.read_text()
    if actual != expected:
        pytest.fail(f"compiled pipeline '{name}' differs from its golden file. If the change is intended, "
                    f"regenerate and review: {REGENERATE}\n{first_differences(expected, actual, name)}",
                    pytrace=False)
