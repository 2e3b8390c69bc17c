"""The layering, read from the imports: stages are leaves, the library sits under everything.

- A stage (``kubetune/stages/<name>.py``) imports no other stage: what two stages share lives
  in a library module (``kubetune/lib``, ``kubetune/core``, ``kubetune/methods``), so a stage
  can change without changing another and a task runs only its own step.
- Only the places that run stages import ``kubetune.stages``: the CLI, the KFP components (each
  a thin wrapper over one stage) and the stages themselves.
- ``kubetune/lib`` is the bottom layer: it imports nothing of kubetune but ``kubetune.errors``
  and itself, so anything may use it without pulling in training, tracking or a stage.

Imports are read with ``ast`` (every ``import`` statement, also those inside functions, which
is where the heavy ones live), nothing is imported to run the check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"kubetune": "kubetune", "components": "kubetune.components", "pipelines": "kubetune.pipelines"}
STAGES = "kubetune.stages"
# Where importing a stage is the point: the command line runs stages, a component is the KFP
# wrapper of one.
RUN_STAGES = ("kubetune.cli", "kubetune.components", STAGES)

# Modules outside RUN_STAGES that may import kubetune.stages, each with why.
ALLOWED_STAGE_IMPORTS = {
    # The preflight builds every task's config (each stage's config dataclass) from the pipeline's
    # parameters, with the same call its component makes, to refuse bad input before a run starts.
    "kubetune.ops.preflight": "builds every stage's config from pipeline parameters before a run",
    # Commands behind the CLI (`kubetune advise`, `kubetune compare`), above the stages as the CLI
    # is: they read the user's data with ingest's public check(), so they see the shape, rows and
    # split a pipeline's first step would.
    "kubetune.tools.advise": "reads data with stages.ingest.check, as a pipeline would",
    "kubetune.tools.compare": "reads data with stages.ingest.check, as a pipeline would",
}



def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def imports(path: Path, text: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) of every import in ``path``.

    ``from kubetune.stages import ingest`` names the module ``kubetune.stages.ingest`` (a
    submodule imported by name); ``from kubetune.stages.ingest import check`` gives the module
    and the name. Relative imports are resolved against the file's package.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if base == STAGES or (base == "kubetune" and a.name == "stages"):
                    out.append((node.lineno, f"{base}.{a.name}" if base == STAGES else STAGES, None))
                else:
                    out.append((node.lineno, base, a.name))
    return out


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(files: dict[Path, str | None] | None = None) -> list[str]:
    """Every import that breaks a rule, as ``file:line: module imports target (rule)``.

    Args:
        files: Source files to check, each with its text (None: read the file); default: all.
    """
    found = []
    for path, text in (files or dict.fromkeys(sources())).items():
        me = module_name(path)
        where = path.relative_to(ROOT)
        for line, target, name in imports(path, text):
            what = f"{where}:{line}: {me} imports {target}" + (f".{name}" if name else "")
            if inside(me, STAGES) and inside(target, STAGES) and target not in (STAGES, me):
                found.append(f"{what} (a stage imports another stage; move the shared piece into a library)")
            elif inside(target, STAGES) and not any(inside(me, p) for p in RUN_STAGES) \
                    and me not in ALLOWED_STAGE_IMPORTS:
                found.append(f"{what} (only the CLI, components and stages import stages)")
            if name is not None and name.startswith("_") and inside(target, STAGES) and target != me:
                found.append(f"{what} (a stage's private name; give the stage a public function for it)")
            if inside(me, "kubetune.lib") and inside(target, "kubetune") and not (
                    target == "kubetune.errors" or inside(target, "kubetune.lib")):
                found.append(f"{what} (kubetune.lib imports only kubetune.errors and kubetune.lib)")
    return found


def test_the_layers_hold():
    found = violations()
    assert not found, "imports that break the layering:\n" + "\n".join(found)


def test_the_allowlists_are_still_needed():
    """An allowlist entry whose import is gone is dropped, so the list stays the truth."""
    seen = {(module_name(p), target, name) for p in sources() for _, target, name in imports(p)}
    stale = [me for me in ALLOWED_STAGE_IMPORTS
              if not any(m == me and inside(t, STAGES) for m, t, _ in seen)]
    assert not stale, f"allowlist entries with no such import left (remove them): {stale}"


@pytest.mark.parametrize("where, source, expected", [
    ("stages", "from kubetune.stages.ingest import check\n", "a stage imports another stage"),
    ("stages", "from kubetune.stages import ingest\n", "a stage imports another stage"),
    ("stages", "from . import ingest\n", "a stage imports another stage"),
    ("stages", "def f():\n    import kubetune.stages.ingest\n", "a stage imports another stage"),
    ("methods", "from kubetune.stages.ingest import check\n", "only the CLI, components and stages"),
    ("methods", "from kubetune import stages\n", "only the CLI, components and stages"),
    ("cli.py", "from kubetune.stages.ingest import _ingest\n", "a stage's private name"),
    ("lib", "from kubetune.core import models\n", "kubetune.lib imports only"),
    ("lib", "from ..tracking import log_metrics\n", "kubetune.lib imports only"),
])
def test_each_way_of_breaking_a_rule_is_found(where, source, expected):
    """The checker itself: every spelling of a forbidden import is caught, also inside a function."""
    probe = ROOT / "kubetune" / where if where.endswith(".py") else ROOT / "kubetune" / where / "_probe.py"
    found = violations({probe: source})
    assert len(found) == 1 and expected in found[0] and f"{probe.relative_to(ROOT)}:" in found[0], found


@pytest.mark.parametrize("where, source", [
    ("stages", "from kubetune.lib.dataset import load_dataset_dir\nfrom kubetune.core.train import TrainConfig\n"),
    ("components", "from kubetune.stages.ingest import ingest\n"),
    ("lib", "from kubetune.errors import DataError\nfrom kubetune.lib import storage\nfrom . import stats\n"),
])
def test_what_the_layers_allow_passes(where, source):
    probe = ROOT / where / "_probe.py" if where == "components" else ROOT / "kubetune" / where / "_probe.py"
    assert violations({probe: source}) == []
