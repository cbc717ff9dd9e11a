"""The KubeRay manifests of deploy/kuberay/, checked offline: no cluster, no Ray started.

- Both manifests validate against KubeRay v1.7.0's own CRD schemas (vendored), *closed* the way an
  API server treats a structural schema: an unknown field is pruned there, so a misspelt one
  silently does nothing; here it fails. Plus the enums and name rules KubeRay enforces in Go.
- The RayService's serveConfigV2 is what ``python -m kdray.deploy.kuberay`` writes from
  serve/config.yaml, parses with Ray Serve's schema, and its import path imports.
- The image is the Dockerfile's, on the Ray version installed here; the RayJob's entrypoint is
  accepted by tune/run.py's own parser and config loader; the API token comes from a Secret.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from kdray.cli import build_parser
from kdray.config import load_config
from kdray.deploy import kuberay as gen
from kdray.serving.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
MANIFESTS = {"RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}

# Enforced by KubeRay v1.7.0's Go code, not by its CRD (commit 59d663ae, schemas/SOURCE.md):
# JobSubmissionMode in ray-operator/apis/ray/v1/rayjob_types.go, RayServiceUpgradeType in
# rayservice_types.go (ValidateRayServiceSpec in controllers/ray/utils/validation.go refuses others).
SUBMISSION_MODES = ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
UPGRADE_TYPES = ["NewClusterWithIncrementalUpgrade", "NewCluster", "None"]
# ValidateRayJobMetadata / ValidateRayServiceMetadata: a DNS-1035 label of at most
# MaxRayClusterNameLength - 6 = 47 characters. The namespace is always written out here.
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47},
        "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def close(node: Any) -> None:
    """Refuse unknown fields: every object schema with ``properties`` and no
    ``additionalProperties`` / ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false`` (maps, which have ``additionalProperties``, stay open)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            close(value)
    elif isinstance(node, list):
        for value in node:
            close(value)


@functools.cache
def _vendored(kind: str) -> dict[str, Any]:
    return json.loads((KUBERAY / "schemas" / f"{kind.lower()}.v1.json").read_text())


@functools.cache
def _closed(kind: str) -> dict[str, Any]:
    schema = copy.deepcopy(_vendored(kind))
    close(schema)
    schema["properties"]["metadata"] = METADATA
    spec = schema["properties"]["spec"]["properties"]
    if kind == "RayJob":
        spec["submissionMode"]["enum"] = SUBMISSION_MODES
        cluster = spec["rayClusterSpec"]
    else:
        spec["upgradeStrategy"]["properties"]["type"]["enum"] = UPGRADE_TYPES
        cluster = spec["rayClusterConfig"]
    # The cluster's own upgradeStrategy (Recreate/None) is refused for a cluster a RayJob or a
    # RayService creates (ValidateRayClusterUpgradeOptions): an easy mix-up with the service's.
    del cluster["properties"]["upgradeStrategy"]
    return schema


def errors(doc: dict[str, Any], kind: str, closed: bool = True) -> list[str]:
    schema = _closed(kind) if closed else _vendored(kind)
    found = jsonschema.Draft4Validator(schema).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found)


def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


def groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray container (KubeRay's index 0) of the head and of every worker group."""
    return [group["template"]["spec"]["containers"][0] for group in groups(doc)]


@functools.cache
def dockerfile() -> dict[str, Any]:
    text = (KUBERAY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    labels = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', text))
    return {
        "text": text,
        "base": re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base),
        "image": f"{labels['title']}:{labels['version']}",
        "version": labels["version"],
        "workdir": re.findall(r"^WORKDIR (\S+)$", text, re.MULTILINE)[-1],
        "env": dict(re.findall(r"^ENV (\w+)=(\S+)$", text, re.MULTILINE)),
        "copied": [
            Path(src).parts[0]
            for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE)
            for src in line.split()
        ],
    }


def in_repo(path: str) -> Path:
    """A path inside the image's checkout (the Dockerfile's WORKDIR), in this repository."""
    relative = Path(path).relative_to(dockerfile()["workdir"])
    assert relative.parts[0] in dockerfile()["copied"], f"{path}: the Dockerfile does not copy it"
    return REPO / relative


# -- the closed CRD schemas --------------------------------------------------------------------


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_validates_against_closed_crd_schema(kind):
    doc = load(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert errors(doc, kind) == []


POD = ("template", "spec", "containers", 0)


@pytest.mark.parametrize(
    ("kind", "where", "good", "bad"),
    [
        ("RayJob", ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        ("RayService", ("spec",), "serveConfigV2", "serveConfigv2"),
        # Deep in a pod template: the CRD expands PodTemplateSpec in full, so closing it counts.
        ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 1, *POD), "volumeMounts", "volumeMount"),
        ("RayService", ("spec", "rayClusterConfig", "headGroupSpec", *POD, "resources"), "limits", "limit"),
    ],
)  # fmt: skip
def test_closed_schema_refuses_a_misspelt_field(kind, where, good, bad):
    doc = load(kind)
    node = doc
    for step in where:
        node = node[step]
    node[bad] = node.pop(good)
    assert errors(doc, kind, closed=False) == []  # the CRD as vendored accepts the typo
    found = errors(doc, kind)
    assert any(f"'{bad}' was unexpected" in e for e in found), found


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("RayJob", ("spec", "submissionMode"), "K8sJob"),
        ("RayService", ("spec", "upgradeStrategy", "type"), "BlueGreen"),
        ("RayJob", ("metadata", "name"), "kdray_sweep"),  # not DNS-1035
        ("RayService", ("metadata", "name"), "k" * 48),  # KubeRay appends to it: 47 at most
        ("RayService", ("spec", "rayClusterConfig", "rayVersion"), 2.6),  # a string
        ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),
    ],
)
def test_closed_schema_refuses_a_bad_value(kind, path, value):
    doc = load(kind)
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    found = errors(doc, kind)
    assert found and all(e.startswith("/".join(path)) for e in found), found


def test_cluster_upgrade_strategy_is_refused_inside_a_rayservice():
    doc = load("RayService")
    doc["spec"]["rayClusterConfig"]["upgradeStrategy"] = {"type": "Recreate"}
    assert errors(doc, "RayService", closed=False) == []
    assert "'upgradeStrategy' was unexpected" in " ".join(errors(doc, "RayService"))


def test_choices_kuberay_validates_in_go():
    job, service = load("RayJob")["spec"], load("RayService")["spec"]
    assert job["submissionMode"] == "K8sJobMode"
    assert service["upgradeStrategy"]["type"] == "NewCluster"
    # validation.go: a TTL needs shutdownAfterJobFinishes; without autoscaling every worker
    # group needs minReplicas and maxReplicas; replicas lie between them.
    assert job["ttlSecondsAfterFinished"] > 0 and job["shutdownAfterJobFinishes"] is True
    for doc in (load("RayJob"), load("RayService")):
        for group in groups(doc)[1:]:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    # The deprecated thresholds (unused, kuberay#1685) are not set.
    assert "serviceUnhealthySecondThreshold" not in service
    assert "deploymentUnhealthySecondThreshold" not in service


# -- serveConfigV2: generated, Serve's schema, importable ------------------------------------


def test_rayservice_serve_config_is_up_to_date(capsys):
    assert gen.main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_when_serve_config_changed(tmp_path, capsys):
    source = (REPO / "serve" / "config.yaml").read_text()
    assert "max_body_mb: 10 " in source
    changed = tmp_path / "config.yaml"
    changed.write_text(source.replace("max_body_mb: 10 ", "max_body_mb: 12 "))
    assert gen.main(["--check", "--serve-config", str(changed)]) == 1
    err = capsys.readouterr().err
    assert "serveConfigV2 differs" in err and gen.COMMAND in err
    assert "+        max_body_mb: 12" in err  # the diff shows what changed


def test_check_fails_on_a_hand_edited_manifest_and_the_command_restores_it(tmp_path, capsys):
    original = (KUBERAY / "rayservice.yaml").read_text()
    edited = tmp_path / "rayservice.yaml"
    edited.write_text(original.replace("        max_body_mb: 10\n", "        max_body_mb: 50\n"))
    assert edited.read_text() != original
    assert gen.main(["--check", "--manifest", str(edited)]) == 1
    assert "serveConfigV2 differs" in capsys.readouterr().err
    assert gen.main(["--manifest", str(edited)]) == 0
    assert edited.read_text() == original  # only the block is rewritten; comments are kept


def test_generator_refuses_a_config_serve_or_kdray_would_refuse(tmp_path, capsys):
    source = (REPO / "serve" / "config.yaml").read_text()
    for bad, named in [
        (source.replace("max_body_mb: 10 ", "max_body_mbb: 10 "), "args.max_body_mbb"),
        (source.replace("proxy_location: EveryNode", "proxy_location: Nowhere"), "proxy_location"),
    ]:
        path = tmp_path / "config.yaml"
        path.write_text(bad)
        assert gen.main(["--check", "--serve-config", str(path)]) == 2
        assert named in capsys.readouterr().err


def test_cluster_changes_to_the_laptop_config():
    laptop = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    laptop["applications"][0]["args"]["tracking_uri"] = "sqlite:////home/me/workspace/mlflow.db"
    cluster = gen.cluster_serve_config(laptop)
    assert laptop["http_options"]["host"] == "127.0.0.1"
    assert cluster["http_options"]["host"] == "0.0.0.0"
    assert cluster["applications"][0]["args"]["tracking_uri"] is None
    deployments = cluster["applications"][0]["deployments"]
    cpus = {d["name"]: d["ray_actor_options"]["num_cpus"] for d in deployments}
    assert 0 not in cpus.values() and cpus["Gateway"] == 2


def test_serve_config_v2_parses_with_ray_serve_schema_and_imports(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(load("RayService")["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.http_options.host == "0.0.0.0"
    # In the image, PYTHONPATH is the checkout (test_image_is_the_dockerfiles): so here.
    monkeypatch.syspath_prepend(str(REPO))
    assert parsed.applications
    for app in parsed.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app.import_path
        settings = load_settings(app.args)
        assert settings.tracking_uri is None  # the pods' $MLFLOW_TRACKING_URI
        assert settings.auth == "token"


# -- image, token, entrypoint ------------------------------------------------------------------


def test_image_is_the_dockerfiles():
    docker = dockerfile()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert docker["version"] == version
    assert docker["base"] == f"rayproject/ray:{ray.__version__}-{py}"
    assert f"-t {docker['image']} ." in docker["text"]  # the documented build command
    assert docker["env"]["PYTHONPATH"] == docker["workdir"]
    for source in docker["copied"]:
        assert (REPO / source).exists(), source
    for kind in MANIFESTS:
        doc = load(kind)
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__
        assert {c["image"] for c in containers(doc)} == {docker["image"]}


def test_api_token_comes_from_a_secret():
    service = load("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    token_env = config["applications"][0]["args"]["token_env"]
    assert gen.manifest_problems(service, config) == []
    for container in containers(service):
        (env,) = [e for e in container["env"] if e["name"] == token_env]
        assert set(env) == {"name", "valueFrom"} and env["valueFrom"]["secretKeyRef"]["key"]
    literal = copy.deepcopy(service)
    env = next(e for e in containers(literal)[1]["env"] if e["name"] == token_env)
    env.pop("valueFrom")
    env["value"] = "hunter2"
    assert gen.manifest_problems(literal, config) == [
        f"serve: ${token_env} is a literal value; take it from a Secret"
    ]
    containers(literal)[0]["env"] = []
    assert f"head: ${token_env} is not set from a secretKeyRef" in gen.manifest_problems(
        literal, config
    )


def test_rayjob_entrypoint_is_what_tune_run_accepts():
    job = load("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and in_repo(argv[1]) == REPO / "tune" / "run.py"
    try:
        args = build_parser().parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"tune/run.py refuses the entrypoint's flags: {argv[2:]}")
    config = in_repo(args.config)
    assert config == REPO / "configs" / "cluster.yaml" and config.is_file()
    cfg = load_config(config, args.overrides)
    # The config file names an MLflow server; the entrypoint hands the choice to the pods' env.
    assert cfg.mlflow.tracking_uri is None
    # Ray's storage_path and the workspace are on the volume every Ray pod mounts.
    claim = yaml.safe_load((KUBERAY / "pvc.yaml").read_text())
    assert claim["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for group in groups(job):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = pod["containers"][0]["volumeMounts"]
        claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim_name == claim["metadata"]["name"]
        assert cfg.ray.storage_path.startswith(mount["mountPath"] + "/")
        assert args.workspace.startswith(mount["mountPath"] + "/")


def test_every_ray_container_gets_mlflow_and_gpus_where_teachers_run():
    for kind in MANIFESTS:
        for container in containers(load(kind)):
            env = {e["name"]: e for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    job = load("RayJob")
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers(job)]
    assert gpus == [None, None, "1"]  # head, CPU workers, GPU workers (KubeRay: --num-gpus 1)
    for container in containers(job) + containers(load("RayService")):
        resources = container["resources"]
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_docs_create_what_the_manifests_reference():
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    job, service = load("RayJob"), load("RayService")
    secrets = {
        job["spec"]["rayClusterSpec"]["authOptions"]["secretName"],
        service["spec"]["rayClusterConfig"]["authOptions"]["secretName"],
    }
    for container in containers(service):
        secrets |= {
            e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
        }
    namespace = job["metadata"]["namespace"]
    assert service["metadata"]["namespace"] == namespace
    for name in secrets:
        assert f"kubectl -n {namespace} create secret generic {name}" in docs, name
    assert "kubectl apply -f deploy/kuberay/pvc.yaml" in docs
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in docs
