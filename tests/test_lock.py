"""The lock is a lock: every package the project installs is pinned and hashed, the set is
closed under dependencies, it agrees with the top-level pins, and what installs it (the
images, `make setup`) installs it hash-checked. CI builds no image, so the images' install
commands are read from the Dockerfiles and checked against the files here."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
MODELS_LOCK = REPO / "requirements-models.lock"
MLFLOW_LOCK = REPO / "images" / "mlflow-server.lock"
PIP_LOCK = REPO / "requirements-pip.lock"
ALL_LOCKS = [LOCK, DEV_LOCK, MODELS_LOCK, MLFLOW_LOCK, PIP_LOCK]

#: The platform the locks are compiled for (Makefile: lock): Linux x86_64, CPython 3.11.
TARGET = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
          "platform_machine": "x86_64", "python_version": "3.11", "python_full_version": "3.11.14",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def parse_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """``{name: (version, hashes)}`` of a hashed requirements file; fails on any unpinned line."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())  # one requirement per line
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)((?: --hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"{path.name}: not a pinned, hashed requirement: {line[:120]}"
        out[canonicalize_name(m.group(1))] = (m.group(3), frozenset(re.findall(r"sha256:([0-9a-f]{64})", m.group(4))))
    return out


def top_level(path: Path) -> dict[str, Requirement]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            r = Requirement(line)
            reqs[canonicalize_name(r.name)] = r
    return reqs


@pytest.mark.parametrize("path", ALL_LOCKS, ids=lambda p: p.name)
def test_every_locked_requirement_is_pinned_and_hashed(path):
    assert len(parse_lock(path)) >= (1 if path == PIP_LOCK else 2)


def test_the_lock_holds_the_top_level_pins_and_no_cuda_wheels():
    lock = parse_lock(LOCK)
    for name, req in top_level(REPO / "requirements.txt").items():
        assert name in lock, name
        assert req.specifier.contains(lock[name][0]), (name, str(req.specifier), lock[name][0])
    assert "bitsandbytes" in lock  # QLoRA on the cluster
    # torch is the CPU build: none of the CUDA libraries a PyPI torch wheel pulls in.
    assert not [n for n in lock if n.startswith(("nvidia-", "triton", "cuda-"))]
    dev = parse_lock(DEV_LOCK)
    for name, req in top_level(REPO / "requirements-dev.txt").items():
        assert name in dev and req.specifier.contains(dev[name][0]), name
    for name, req in top_level(REPO / "requirements-models.txt").items():
        assert parse_lock(MODELS_LOCK)[name][0] in req.specifier, name


def test_dev_lock_is_the_runtime_lock_plus_tools():
    lock, dev = parse_lock(LOCK), parse_lock(DEV_LOCK)
    drift = {n: (v, dev.get(n)) for n, v in lock.items() if dev.get(n) != v}
    assert not drift, drift
    server = parse_lock(MLFLOW_LOCK)
    assert all(lock[n] == v for n, v in server.items()), "images/mlflow-server.lock drifted from the lock"


def test_the_lock_is_closed_under_dependencies():
    """Every dependency of every locked package (for Linux x86_64 / CPython 3.11, with the
    extras the lock's own requirements ask for) is itself in the lock. Read from the installed
    metadata: the test environment is the lock (next test)."""
    lock = parse_lock(DEV_LOCK)
    wanted_extras: dict[str, set[str]] = {}
    for path in (REPO / "requirements.txt", REPO / "requirements-dev.txt"):
        for name, req in top_level(path).items():
            wanted_extras.setdefault(name, set()).update(req.extras)
    missing = []
    todo = list(lock)
    seen = set()
    while todo:
        name = todo.pop()
        extras = tuple(sorted(wanted_extras.get(name, ())))
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name} (not installed: cannot read its dependencies)")
            continue
        for spec in requires:
            dep = Requirement(spec)
            if dep.marker and not any(dep.marker.evaluate({**TARGET, "extra": e}) for e in ("", *extras)):
                continue
            dn = canonicalize_name(dep.name)
            if dn not in lock:
                missing.append(f"{name} -> {spec}")
            elif not dep.specifier.contains(lock[dn][0], prereleases=True):
                missing.append(f"{name} -> {spec}, locked {lock[dn][0]}")
            elif dep.extras - wanted_extras.get(dn, set()):
                wanted_extras.setdefault(dn, set()).update(dep.extras)
                todo.append(dn)
    assert not missing, missing


def test_the_test_environment_is_the_lock():
    # setuptools is the one the venv was created with on a machine set up before the lock;
    # `make setup` on a fresh machine installs the locked one.
    lock = parse_lock(DEV_LOCK)
    wrong = {}
    for name, (version, _) in lock.items():
        if name == "setuptools":
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != version:
            wrong[name] = (version, installed)
    assert not wrong, wrong


def _find_links() -> list[Path]:
    raw = os.environ.get("PIP_FIND_LINKS", "")
    return [Path(p) for p in raw.split() if p and Path(p).is_dir()]


def test_torch_hash_is_the_wheel_this_machine_installs():
    """The lock's torch hash is the one of the CPU wheel pip finds here (PIP_FIND_LINKS):
    `make setup` on a fresh machine like this one installs exactly that file."""
    version, hashes = parse_lock(LOCK)["torch"]
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = [w for d in _find_links() for w in d.glob(f"torch-{version}+cpu-{py}-{py}-*linux*_x86_64.whl")]
    if not wheels:
        pytest.skip("no local torch CPU wheel on this machine (PIP_FIND_LINKS)")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    assert digest in hashes, (wheels[0].name, digest)


def test_everything_that_installs_uses_the_lock_hash_checked():
    makefile = (REPO / "Makefile").read_text()
    setup = makefile[makefile.index("$(STAMP):"):makefile.index("setup: $(STAMP)")]
    installs = [line.strip() for line in setup.splitlines() if " install " in line]
    # Every install of a requirements file is hash-checked; the only other one is the project itself.
    for line in installs:
        assert "--require-hashes" in line or line.endswith("--no-deps -e ."), line
    assert "-r requirements-pip.lock" in installs[0]  # a pip that handles extras in hash mode, first
    assert any("-r requirements-dev.lock" in line for line in installs)
    assert any("-r requirements-models.lock" in line for line in installs)
    for dockerfile in ("Dockerfile.train", "Dockerfile.cpu"):
        text = re.sub(r"\\\n\s*", " ", (REPO / "images" / dockerfile).read_text())
        pip_runs = [m for m in re.findall(r"^RUN (pip install .*)$", text, re.M) if " -r " in m]
        assert {re.search(r"-r (\S+)", r).group(1) for r in pip_runs} == {"requirements.lock", "requirements-models.lock"}
        assert all("--require-hashes" in r for r in pip_runs), pip_runs
