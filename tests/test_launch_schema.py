"""The TrainJob the launcher writes, checked against the TrainJob CRD of Kubeflow Trainer v2.3.

tests/schemas/trainer.kubeflow.org_trainjobs.v2.3.0.yaml is the CRD file of the v2.3.0 release
(manifests/base/crds/ in kubeflow/trainer), unchanged. The API server treats a CRD schema as
structural: a field the schema does not name is pruned, silently, unless the object is marked
x-kubernetes-preserve-unknown-fields. The validator below turns the schema into JSON Schema with
``additionalProperties: false`` wherever the server would prune, so a dropped field fails here.
CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune.ops.kube import Profile, Resources, load_profile
from kubetune.launcher.trainjob import build_manifest, main

CRD = Path(__file__).parent / "schemas" / "trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
CFG = "/workspace/jobs/j1/config.json"


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as JSON Schema that rejects what the API server prunes."""
    out: dict[str, Any] = {}
    if schema.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    for key in ("type", "enum", "required", "minimum", "maximum", "minLength", "maxLength", "minItems",
                "maxItems", "pattern"):
        if key in schema:
            out[key] = schema[key]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: structural(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    elif isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = structural(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [structural(s) for s in schema[key]]
    return out


@pytest.fixture(scope="module")
def validator():
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "TrainJob"
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1alpha1"
    schema = structural(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server as ObjectMeta, not through the CRD's schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("profile_name", ["h200x2", "a100x8", "cpu"])
@pytest.mark.parametrize("service_account", [None, "trainer-sa"])
def test_rendered_trainjob_is_valid_for_trainer_v2_3(validator, profile_name, service_account):
    profile = load_profile(profile_name)
    m = build_manifest("kt-abc", CFG, num_nodes=3, profile=profile, namespace="team", service_account=service_account)
    assert not _errors(validator, m)
    assert m["spec"]["runtimePatches"], "placement and volume must be in the manifest"


def test_trainjob_without_workspace_or_placement_is_valid(validator):
    bare = Profile(name="bare", workspace_pvc="", train=Resources(cpu="2", memory="8Gi"))
    m = build_manifest("kt-bare", CFG, num_nodes=2, profile=bare)
    assert not _errors(validator, m)


def test_cli_dry_run_output_is_valid(validator, capsys):
    assert main(["--config", CFG, "--nodes", "2", "--profile", "h200x2", "--namespace", "ml",
                 "--service-account", "sa", "--dry-run"]) == 0
    assert not _errors(validator, yaml.safe_load(capsys.readouterr().out))


def test_validator_rejects_what_the_api_server_prunes(validator):
    m = build_manifest("kt-abc", CFG, num_nodes=2, profile=load_profile("h200x2"))
    # The field Trainer v2.2 removed: the API server prunes it (with the PVC and node selector).
    old = {**m, "spec": {**m["spec"], "podTemplateOverrides": [{"targetJobs": [{"name": "node"}], "spec": {}}]}}
    assert any("podTemplateOverrides" in e for e in _errors(validator, old))
    # An unknown field deep inside the runtime patch: a container patch has no resources.
    deep = yaml.safe_load(yaml.safe_dump(m))
    pod = deep["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    pod["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
    assert any("resources" in e for e in _errors(validator, deep))
    # A wrong type: numProcPerNode is an integer in v2.3.
    typed = yaml.safe_load(yaml.safe_dump(m))
    typed["spec"]["trainer"]["numProcPerNode"] = "auto"
    assert _errors(validator, typed)
