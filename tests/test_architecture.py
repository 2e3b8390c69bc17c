"""The layering, read from the imports: stages are leaves, the library sits under everything.

- A stage (``kubetune/stages/<name>.py``) imports no other stage: what two stages share lives
  in a library module (``kubetune/lib``, ``kubetune/core``, ``kubetune/methods``), so a stage
  can change without changing another and a task runs only its own step.
- Only the places that run stages import ``kubetune.stages``: the CLI, the KFP components (each
  a thin wrapper over one stage) and the stages themselves.
- ``kubetune/lib`` is the bottom layer: it imports nothing of kubetune but ``kubetune.errors``
  and itself, so anything may use it without pulling in training, tracking or a stage.
- Every stage has a test file that runs it: ``tests/test_<stage>.py``, or the file ``STAGE_TESTS``
  names, so a new stage without tests fails the suite.

Imports are read with ``ast`` (every ``import`` statement, also those inside functions, which
is where the heavy ones live), nothing is imported to run the check.
"""

from __future__ import annotations

import ast
import re
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


# --------------------------------------------------------------------------------------
# Every stage has tests: tests/test_<stage>.py, or the file named below, and that file runs it.
# --------------------------------------------------------------------------------------

TESTS = ROOT / "tests"
# Stages tested in a file not named after them (the stages of one method or pipeline share a
# file, as their tests share fixtures and one kfp.local run), each with the file that runs it.
STAGE_TESTS = {
    # The two training stages share the training core; test_train.py runs both on the tiny model.
    "train_full": "test_train.py",
    "train_peft": "test_train.py",
    # Mixture of Agents: one kfp.local run of the `moa` pipeline proposes, aggregates, evaluates.
    "propose": "test_moa_pipeline.py",
    "aggregate_moa": "test_moa_pipeline.py",
    "evaluate_moa": "test_moa_pipeline.py",
    # RLHF and DPO: the stages with MLflow, and the `rlhf` and `dpo` pipelines through kfp.local.
    "preference_sft_data": "test_rlhf_pipelines.py",
    "reward_model": "test_rlhf_pipelines.py",
    "ppo": "test_rlhf_pipelines.py",
    "dpo": "test_rlhf_pipelines.py",
    "evaluate_policy": "test_rlhf_pipelines.py",
    # Feature extraction: embed, fit the head, score it, as stages and as the pipeline.
    "embed": "test_feature_extraction.py",
    "train_head": "test_feature_extraction.py",
    "evaluate_head": "test_feature_extraction.py",
}


def stage_functions(folder: Path = ROOT / "kubetune" / "stages") -> list[str]:
    """The stages: each module of ``folder`` that defines a top-level function named after itself."""
    return sorted(p.stem for p in folder.glob("*.py") if any(
        isinstance(n, ast.FunctionDef) and n.name == p.stem for n in ast.parse(p.read_text()).body))


def pipeline_stages(folder: Path = ROOT / "pipelines") -> dict[str, set[str]]:
    """Pipeline name -> the components (one per stage) its module wires, read from its source."""
    out = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        name = next((n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", None) == "NAME" and isinstance(n.value, ast.Constant)), None)
        if name:
            out[name] = {a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                         and n.module == "kubetune.components" for a in n.names}
    return out


def runs_stage(source: str, stage: str, pipelines: dict[str, set[str]]) -> bool:
    """Whether a test file's source runs ``stage``: it calls it (``stage(``), reads its kfp.local
    task by name (``"stage-name"``), or runs through kfp.local a pipeline that wires it."""
    if re.search(rf"\b{stage}\(", source) or re.search(rf"""["']{stage.replace("_", "-")}["']""", source):
        return True
    return any(stage in pipelines.get(p, ()) for p in re.findall(r"""run_local\(\s*["']([\w-]+)["']""", source))


def untested_stages(stages: list[str], mapping: dict[str, str], tests: dict[str, str],
                    pipelines: dict[str, set[str]]) -> list[str]:
    """Each stage without a test file that runs it, and each mapping entry that is no longer true.

    Args:
        stages: The stage names (``stage_functions()``).
        mapping: Stage -> the test file covering it, for stages without ``test_<stage>.py``.
        tests: Test file name -> its source.
        pipelines: ``pipeline_stages()``.

    Returns:
        One line per problem, naming the stage and the file.
    """
    found = []
    for stage in stages:
        own = f"test_{stage}.py"
        if own in tests and stage in mapping:
            found.append(f"{stage}: has {own}; drop its STAGE_TESTS entry ({mapping[stage]})")
        file = own if own in tests else mapping.get(stage)
        if file is None:
            found.append(f"{stage}: no tests/{own} and no STAGE_TESTS entry")
        elif file not in tests:
            found.append(f"{stage}: STAGE_TESTS names tests/{file}, which does not exist")
        elif not runs_stage(tests[file], stage, pipelines):
            found.append(f"{stage}: tests/{file} never runs it")
    found += [f"{stage}: STAGE_TESTS entry for a stage that does not exist" for stage in mapping if stage not in stages]
    return found


def test_every_stage_has_a_test_file_that_runs_it():
    tests = {p.name: p.read_text() for p in TESTS.glob("test_*.py")}
    found = untested_stages(stage_functions(), STAGE_TESTS, tests, pipeline_stages())
    assert not found, "stages without tests:\n" + "\n".join(found)


def test_a_stage_without_tests_is_found():
    """The checker itself: a new stage, a mapping to a file that never runs it, a stale entry."""
    pipelines = {"p": {"wired"}}
    tests = {"test_a.py": "a(cfg)", "test_b.py": "b_config = 1", "test_p.py": 'run_local("p", {})',
             "test_t.py": 'runs["task-name"]'}
    assert untested_stages(["a", "wired", "task_name"], {"wired": "test_p.py", "task_name": "test_t.py"},
                           tests, pipelines) == []
    assert untested_stages(["new"], {}, tests, pipelines) == ["new: no tests/test_new.py and no STAGE_TESTS entry"]
    assert untested_stages(["b"], {}, tests, pipelines) == ["b: tests/test_b.py never runs it"]
    assert untested_stages(["c"], {"c": "test_p.py"}, tests, pipelines) == ["c: tests/test_p.py never runs it"]
    assert untested_stages(["c"], {"c": "test_gone.py"}, tests, pipelines) == [
        "c: STAGE_TESTS names tests/test_gone.py, which does not exist"]
    assert untested_stages(["a"], {"a": "test_p.py", "gone": "test_p.py"}, tests, pipelines) == [
        "a: has test_a.py; drop its STAGE_TESTS entry (test_p.py)",
        "gone: STAGE_TESTS entry for a stage that does not exist"]
