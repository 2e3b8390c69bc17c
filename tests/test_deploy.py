"""Deploy: the InferenceService against KServe's CRD schema, the cluster path through the real kubernetes
client against a local server speaking the Kubernetes API, rollback on a failed smoke test, and the local
`mlflow models serve` path."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kubetune.serving.deploy import Target, render

CRD = Path(__file__).parent / "data" / "kserve_inferenceservices_crd.yaml"


@pytest.fixture(scope="module")
def isvc_schema():
    crd = yaml.safe_load(CRD.read_text())
    (v1beta1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return v1beta1["schema"]["openAPIV3Schema"]


def _validate(obj: dict, schema: dict) -> None:
    import jsonschema

    jsonschema.Draft7Validator(schema).validate(obj)


LORA = Target("tickets-peft", "3", "lora", "HuggingFaceTB/SmolLM2-135M-Instruct",
              "s3://mlflow/1/models/m-1/artifacts/artifacts/model", "vllm", None)
FULL = Target("tickets-full", "2", "full", "smollm2-135m-instruct",
              "s3://mlflow/1/models/m-2/artifacts/artifacts/model", "vllm", None)
PYFUNC = Target("tickets_head", "1", "feature-extraction", "minilm-l6-v2", "s3://mlflow/1/models/m-3/artifacts",
                "mlflow", "text")


@pytest.mark.parametrize("target", [LORA, FULL, PYFUNC], ids=["lora-on-base", "whole", "mlflow"])
def test_rendered_inference_service_is_valid_for_the_kserve_crd(target, isvc_schema):
    obj = render(target, namespace="team-a", gpus=2)
    _validate(obj, isvc_schema)
    model = obj["spec"]["predictor"]["model"]
    assert obj["apiVersion"] == "serving.kserve.io/v1beta1" and obj["kind"] == "InferenceService"
    assert obj["metadata"]["namespace"] == "team-a" and obj["metadata"]["name"] == target.name.replace("_", "-")
    assert model["storageUri"] == target.storage_uri
    sc = model["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    if target.runtime == "vllm":
        assert model["modelFormat"]["name"] == "huggingface" and "--backend=vllm" in model["args"]
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
        lora = [a for a in model["args"] if a.startswith("--lora-modules=")]
        assert (lora == [f"--lora-modules={obj['metadata']['name']}=/mnt/models"]) == (target.method == "lora")
        assert (f"--model_id={LORA.base_model}" in model["args"]) == (target.method == "lora")
    else:
        assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"


def test_the_schema_check_rejects_a_broken_object(isvc_schema):
    import jsonschema

    obj = render(LORA, namespace="x")
    obj["spec"]["predictor"]["model"]["args"] = "--backend=vllm"  # must be a list
    with pytest.raises(jsonschema.ValidationError):
        _validate(obj, isvc_schema)


# ---------------------------------------------------------------- registry -> runtime


def _version(name: str, folder: Path, method: str, base: str, alias: bool = True, tags: dict | None = None) -> str:
    import mlflow

    from kubetune import tracking
    from kubetune.serving.llm_pyfunc import log_version

    mlflow.set_experiment(name)  # this test's own store: no experiment id left over from another test
    with mlflow.start_run(run_name="register"):
        mv = log_version(name, folder, {"kubetune.method": method, "kubetune.base_model": base, **(tags or {})})
    if alias:
        holder = tracking.get_alias(name, tracking.CHAMPION)
        tracking.move_alias(name, tracking.CHAMPION, str(mv.version),
                            expected_current=str(holder.version) if holder else None)
    return str(mv.version)


@pytest.fixture(scope="module")
def lora_folder(tiny_llama, tmp_path_factory):
    from test_llm_pyfunc import _trained

    return _trained("lora", Path(tiny_llama), tmp_path_factory.mktemp("lora") / "trained")


def test_describe_picks_the_runtime_from_the_version(lora_folder, tiny_llama, mlflow_uri, tmp_path):
    from test_llm_pyfunc import _trained

    from kubetune.serving.deploy import describe

    _version("local-base", lora_folder, "lora", str(tiny_llama))
    _version("hub-base", lora_folder, "lora", "smollm2-135m-instruct")
    _version("whole", _trained("full", Path(tiny_llama), tmp_path / "full"), "full", str(tiny_llama))
    # A base only this machine has cannot be fetched by vLLM: the pyfunc carries it instead.
    assert describe("local-base", "champion").runtime == "mlflow"
    hub = describe("hub-base", "champion")
    assert (hub.runtime, hub.base_model) == ("vllm", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.storage_uri.endswith("/artifacts/model")
    assert describe("whole", "1").runtime == "vllm"


# ---------------------------------------------------------------- the cluster path


class FakeCluster:
    """The Kubernetes API calls deploy makes (create/get/replace an InferenceService), and the predictor's URL.

    ``ready``: whether the InferenceService reports Ready; ``answer``: what the predictor says
    (None = HTTP 500).
    """

    def __init__(self, ready: bool = True, answer: str | None = "hello"):
        self.ready, self.answer, self.objects, self.calls, self.prompts = ready, answer, {}, [], []
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_POST(self):  # noqa: N802
                cluster.calls.append(("POST", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["apis", "serving.kserve.io", "v1beta1"] and parts[5] == "inferenceservices":
                    obj = self._body()
                    key = (parts[4], obj["metadata"]["name"])
                    if key in cluster.objects:
                        return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                    obj["metadata"].update(resourceVersion="1", uid="u-1")
                    cluster.objects[key] = obj
                    return self._send(201, obj)
                cluster.prompts.append(self._body())
                if cluster.answer is None:
                    return self._send(500, {"error": "CUDA out of memory"})
                if parts[0] == "v2":
                    return self._send(200, {"outputs": [{"name": "output-0", "datatype": "BYTES", "shape": [1],
                                                         "data": [cluster.answer]}]})
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": cluster.answer}}]})

            def do_PUT(self):  # noqa: N802
                cluster.calls.append(("PUT", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                obj = self._body()
                cluster.objects[(parts[4], parts[6])] = obj
                return self._send(200, obj)

            def do_GET(self):  # noqa: N802
                cluster.calls.append(("GET", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                obj = cluster.objects.get((parts[4], parts[6])) if len(parts) == 7 else None
                if obj is None:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                cond = {"type": "Ready", "status": "True"} if cluster.ready else \
                    {"type": "Ready", "status": "False", "reason": "RevisionMissing",
                     "message": "Revision failed: ImagePullBackOff"}
                return self._send(200, {**obj, "status": {"url": cluster.url, "conditions": [cond]}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "t"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "team-a"}}]}))
        return path


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    fake = FakeCluster()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield fake
    fake.server.shutdown()


def test_cluster_deploy_applies_waits_and_smoke_tests(cluster, lora_folder, tiny_llama, mlflow_uri, isvc_schema):
    from kubetune import tracking
    from kubetune.stages.deploy import DeployConfig, deploy

    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct")
    result = deploy(DeployConfig(model_name="tickets", target="cluster", namespace="team-a", ready_timeout=5))
    ((ns, name), applied), = cluster.objects.items()
    assert (ns, name) == ("team-a", "tickets")
    _validate(applied, isvc_schema)
    assert applied["spec"]["predictor"]["model"]["modelFormat"]["name"] == "huggingface"
    assert ("GET", "/apis/serving.kserve.io/v1beta1/namespaces/team-a/inferenceservices/tickets") in cluster.calls
    assert [p["messages"][0]["content"] for p in cluster.prompts] == DeployConfig.__dataclass_fields__[
        "smoke_prompts"].default_factory()
    assert result.ok and result.answers == ["hello", "hello"] and result.url == cluster.url
    assert tracking.get_version("tickets", "1").tags["kubetune.deploy"].startswith("cluster vllm")

    # Deploying again replaces the spec of the InferenceService already there (409 -> replace).
    deploy(DeployConfig(model_name="tickets", target="cluster", namespace="team-a", ready_timeout=5))
    assert ("PUT", "/apis/serving.kserve.io/v1beta1/namespaces/team-a/inferenceservices/tickets") in cluster.calls


@pytest.mark.parametrize("failure", ["smoke", "not-ready"])
def test_failed_deploy_rolls_the_champion_back(failure, cluster, lora_folder, mlflow_uri):
    from kubetune import tracking
    from kubetune.errors import StageError
    from kubetune.stages.deploy import DeployConfig, deploy

    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct")
    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct")
    assert str(tracking.get_alias("tickets", tracking.CHAMPION).version) == "2"
    if failure == "smoke":
        cluster.answer = None
    else:
        cluster.ready = False
    with pytest.raises(StageError) as err:
        deploy(DeployConfig(model_name="tickets", target="cluster", namespace="team-a", ready_timeout=1))
    why = "answered 500" if failure == "smoke" else "RevisionMissing: Revision failed: ImagePullBackOff"
    assert why in str(err.value) and "champion: v2 -> v1 (rollback)" in str(err.value)
    assert str(tracking.get_alias("tickets", tracking.CHAMPION).version) == "1"
    assert why in tracking.get_version("tickets", "2").tags["kubetune.deploy"]


def test_models_table_shows_aliases_scores_and_deploys(cluster, lora_folder, mlflow_uri):
    from kubetune.tracking.registry_ops import models_table
    from kubetune.stages.deploy import DeployConfig, deploy

    scores = {"kubetune.primary_metric": "exact_match", "eval.exact_match": "0.5", "base.exact_match": "0.1",
              "eval.bench_kubetune_arithmetic": "0.4167"}
    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct", tags=scores)
    deploy(DeployConfig(model_name="tickets", target="cluster", namespace="team-a", ready_timeout=5))
    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct", alias=False,
             tags={**scores, "eval.exact_match": "0.25"})
    header, v2, v1 = [line.split() for line in models_table("tickets").splitlines()[:3]]  # newest first
    assert header[:9] == ["version", "aliases", "metric", "value", "base", "forgetting", "kubetune_arithmetic",
                          "decision", "deployed"]
    assert v1[:6] == ["v1", "champion", "exact_match", "0.5000", "0.1000", "-"]
    assert v1[6] == "0.4167" and "cluster" in v1
    assert v2[:4] == ["v2", "-", "exact_match", "0.2500"]


def test_local_deploy_serves_and_answers(lora_folder, mlflow_uri, tmp_path):
    from kubetune import tracking
    from kubetune.stages.deploy import DeployConfig, deploy

    _version("tickets", lora_folder, "lora", "smollm2-135m-instruct")
    result = deploy(DeployConfig(model_name="tickets", target="local", smoke_prompts=["hello there"], max_tokens=4,
                                 ready_timeout=120), log_dir=tmp_path)
    assert result.runtime == "mlflow-local" and len(result.answers) == 1 and result.answers[0].strip()
    assert tracking.get_version("tickets", "1").tags["kubetune.deploy"].startswith("local")
    assert str(tracking.get_alias("tickets", tracking.CHAMPION).version) == "1"
