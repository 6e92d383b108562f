"""deploy/kubernetes, checked offline: every core object against the Kubernetes OpenAPI schemas
that `kubernetes-validate` ships (strict: an unknown field fails), every KEDA ScaledObject against
the openAPIV3Schema of KEDA's own CRD (tests/schemas, made as strict), and what the schemas cannot
see against pipeq itself: commands against its argument parser, PIPEQ_* names against Settings,
images against docker-compose.yml, the models.yaml against the registry loader, probe routes and
ports against the API and the worker, and each KEDA list name against config/queues.py."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeq.cli.main import build_parser
from pipeq.config.queues import LANES, queue_name
from pipeq.config.registry import load_registry
from pipeq.config.settings import Settings, known_variables
from pipeq.producer.api import router

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KEDA_CRD = Path(__file__).resolve().parent / "schemas" / "keda.sh_scaledobjects.yaml"
# The oldest Kubernetes the manifests are meant for, and the newest the installed package knows.
K8S_VERSIONS = sorted({"1.30.0", kubernetes_validate.latest_version()})
SECRET = "pipeq-secrets"
# Every key of the Secret the operator creates (README, Kubernetes); only broker-url is required.
SECRET_KEYS = {"broker-url", "result-url", "redis-password", "api-keys", "hf-token"}
EXPECTED = {
    ("ConfigMap", "pipeq-env"),
    ("ConfigMap", "pipeq-models"),
    ("Deployment", "pipeq-api"),
    ("Service", "pipeq-api"),
    ("Deployment", "pipeq-worker"),
    ("Deployment", "pipeq-worker-bulk"),
    ("ScaledObject", "pipeq-worker"),
    ("ScaledObject", "pipeq-worker-bulk"),
}
WORKERS = {"pipeq-worker": "interactive", "pipeq-worker-bulk": "bulk"}


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                documents.append((f"{path.name}: {doc.get('kind')}/{doc['metadata']['name']}", doc))
    return documents


DOCUMENTS = load_documents()
BY_KIND: dict[tuple[str, str], dict[str, Any]] = {
    (doc["kind"], doc["metadata"]["name"]): doc for _, doc in DOCUMENTS
}
CORE = [(where, doc) for where, doc in DOCUMENTS if doc["kind"] != "ScaledObject"]
SCALED = [(where, doc) for where, doc in DOCUMENTS if doc["kind"] == "ScaledObject"]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def strict(schema: Any) -> Any:
    """The CRD schema with `additionalProperties: false` on every object that lists its
    properties: the API server drops (or, with strict field validation, refuses) unknown fields of
    a custom resource, which plain JSON Schema would let through."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def scaledobject_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def scaledobject_errors(doc: dict[str, Any]) -> list[str]:
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in scaledobject_validator().iter_errors(doc)
    ]
    if doc.get("apiVersion") != "keda.sh/v1alpha1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} is not keda.sh/v1alpha1")
    # The CRD's schema leaves metadata to the API server: a DNS-1123 subdomain name.
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    return errors


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def pipeq_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for (kind, name), doc in BY_KIND.items():
        if kind == "Deployment":
            for container in containers(doc):
                yield name, doc, container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variable the container gets: the data of ConfigMaps in `envFrom`, then its `env`
    (which wins, as in Kubernetes)."""
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        config_map = BY_KIND[("ConfigMap", source["configMapRef"]["name"])]
        env.update({key: {"name": key, "value": v} for key, v in config_map["data"].items()})
    return env | {item["name"]: item for item in container.get("env", [])}


def literal_pipeq_values(container: dict[str, Any]) -> dict[str, str]:
    return {
        name: item["value"]
        for name, item in env_of(container).items()
        if name.startswith("PIPEQ_") and "value" in item
    }


def redis_triggers(spec: dict[str, Any]) -> list[dict[str, str]]:
    return [t["metadata"] for t in spec["triggers"] if t["type"] == "redis"]


def registry_models(tmp_path: Path) -> list[str]:
    path = tmp_path / "models.yaml"
    path.write_text(BY_KIND[("ConfigMap", "pipeq-models")]["data"]["models.yaml"])
    return list(load_registry(path).models)


# ---- the schemas ----------------------------------------------------------------------------


def test_every_expected_object_is_there_and_no_secret() -> None:
    assert set(BY_KIND) == EXPECTED, "deploy/kubernetes holds other objects than expected"
    assert len(BY_KIND) == len(DOCUMENTS), "two objects of one kind share a name"
    assert all(doc.get("kind") != "Secret" for _, doc in DOCUMENTS), "credentials in a file"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), CORE, ids=[where for where, _ in CORE])
def test_core_objects_follow_the_kubernetes_schema(
    where: str, doc: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.path)) or "(top)"
        pytest.fail(f"{where} on Kubernetes {version}: {path}: {exc.message}")


@pytest.mark.parametrize(("where", "doc"), SCALED, ids=[where for where, _ in SCALED])
def test_scaled_objects_follow_kedas_crd(where: str, doc: dict[str, Any]) -> None:
    errors = scaledobject_errors(doc)
    assert not errors, f"{where}:\n" + "\n".join(errors)


def test_the_schemas_refuse_broken_manifests() -> None:
    # Guards the guards: a misspelt field, a wrong type, a non-string trigger value must fail.
    deployment = copy.deepcopy(BY_KIND[("Deployment", "pipeq-worker")])
    containers(deployment)[0]["readinesProbe"] = containers(deployment)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    service = copy.deepcopy(BY_KIND[("Service", "pipeq-api")])
    service["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)

    scaled = BY_KIND[("ScaledObject", "pipeq-worker-bulk")]
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicas"] = misspelt["spec"].pop("minReplicaCount")
    not_a_string = copy.deepcopy(scaled)
    not_a_string["spec"]["triggers"][0]["metadata"]["listLength"] = 50
    no_triggers = copy.deepcopy(scaled)
    no_triggers["spec"]["triggers"] = []
    for broken in (misspelt, not_a_string, no_triggers):
        assert scaledobject_errors(broken), broken["spec"]


# ---- what the schemas cannot see -------------------------------------------------------------


def test_commands_are_pipeq_commands_and_images_are_the_compose_ones() -> None:
    images = {"pipeq-api": COMPOSE["api"]["image"], "pipeq-worker": COMPOSE["worker"]["image"]}
    for name, _, container in pipeq_containers():
        command = container["command"]
        assert command[:1] == ["pipeq"], f"{name}: {command} does not run pipeq"
        try:
            build_parser().parse_args(command[1:])
        except SystemExit as exc:
            pytest.fail(
                f"{name}: {command} is not a valid pipeq command (argparse exit {exc.code})"
            )
        expected = images["pipeq-api" if name == "pipeq-api" else "pipeq-worker"]
        assert container["image"] == expected, f"{name}: not the image the Dockerfile target makes"
    assert (
        containers(BY_KIND[("Deployment", "pipeq-api")])[0]["command"] == COMPOSE["api"]["command"]
    )


def test_pipeq_variables_are_settings_and_their_values_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = set(known_variables())
    for name, _, container in pipeq_containers():
        unknown = sorted(v for v in env_of(container) if v.startswith("PIPEQ_") and v not in known)
        assert not unknown, f"{name}: Settings has no {unknown} (pipeq would refuse to start)"
        for variable in list(known):
            monkeypatch.delenv(variable, raising=False)
        for variable, value in literal_pipeq_values(container).items():
            monkeypatch.setenv(variable, value)
        Settings()  # raises on a malformed value


def test_secrets_are_references_to_the_documented_secret() -> None:
    for name, _, container in pipeq_containers():
        for item in container.get("env", []):
            assert "value" in item or "valueFrom" in item, f"{name}: {item['name']} has no value"
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            assert ref["name"] == SECRET and ref["key"] in SECRET_KEYS, f"{name}: {ref}"
            required = ref["key"] == "broker-url"
            assert ref.get("optional", False) is not required, f"{name}: {ref}"
        names = env_of(container)
        assert names["PIPEQ_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "broker-url"
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", readme.split("\n### Kubernetes\n", 1)[1], maxsplit=1)[0]
    missing = sorted(key for key in SECRET_KEYS | {SECRET} if f"`{key}`" not in section)
    assert not missing, f"README's Kubernetes section does not name {missing}"


def test_the_registry_is_mounted_where_pipeq_models_points(tmp_path: Path) -> None:
    assert registry_models(tmp_path)
    for name, doc, container in pipeq_containers():
        models = Path(env_of(container)["PIPEQ_MODELS"]["value"])
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        mounts = [
            m
            for m in container["volumeMounts"]
            if volumes[m["name"]].get("configMap", {}).get("name") == "pipeq-models"
        ]
        assert [Path(m["mountPath"]) / models.name for m in mounts] == [models], name


def test_api_serves_its_port_and_probes_its_health_route() -> None:
    (container,) = containers(BY_KIND[("Deployment", "pipeq-api")])
    port = int(container["command"][container["command"].index("--port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    routes = {getattr(route, "path", None) for route in router.routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == "http"
    service = BY_KIND[("Service", "pipeq-api")]
    assert (
        service["spec"]["selector"]
        == BY_KIND[("Deployment", "pipeq-api")]["spec"]["selector"]["matchLabels"]
    )
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_gpu_worker_pod(name: str) -> None:
    spec = BY_KIND[("Deployment", name)]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = build_parser().parse_args(container["command"][1:])
    assert command.gpus == "auto" and command.procs_per_gpu
    for resources in ("requests", "limits"):
        assert int(container["resources"][resources]["nvidia.com/gpu"]) == 1
    # Metrics: one port per front from PIPEQ_METRICS_PORT up, bound where the kubelet reaches it.
    env = env_of(container)
    assert env["PIPEQ_METRICS_HOST"]["value"] == "0.0.0.0"
    # The setting's default, not this process's environment (the suite sets its own port).
    default = Settings.model_fields["metrics_port"].default
    first = int(env.get("PIPEQ_METRICS_PORT", {}).get("value", default))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == list(range(first, first + command.procs_per_gpu))
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/metrics" and ports[get["port"]] == first
    assert container["readinessProbe"]["exec"]["command"] == ["pipeq-worker-ping"]
    # The drain: SIGTERM to `pipeq worker` (PID 1), then wait for it, within a long grace period.
    stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert stop[:2] == ["/bin/sh", "-c"] and "kill -TERM 1" in stop[2] and "kill -0 1" in stop[2]
    assert spec["terminationGracePeriodSeconds"] >= 120  # docker-compose.yml's stop_grace_period


def test_worker_pods_differ_only_in_their_labels() -> None:
    def template(name: str) -> dict[str, Any]:
        found = copy.deepcopy(BY_KIND[("Deployment", name)]["spec"]["template"])
        found["metadata"].pop("labels")
        return dict(found)

    assert template("pipeq-worker") == template("pipeq-worker-bulk")


def test_keda_scales_each_worker_on_its_lane_lists(tmp_path: Path) -> None:
    models = registry_models(tmp_path)
    for name, lane in WORKERS.items():
        scaled = BY_KIND[("ScaledObject", name)]["spec"]
        target = scaled["scaleTargetRef"]
        assert target["name"] == name and target.get("kind", "Deployment") == "Deployment"
        (container,) = containers(BY_KIND[("Deployment", name)])
        assert target["envSourceContainerName"] == container["name"]
        served = build_parser().parse_args(container["command"][1:]).models
        triggers = redis_triggers(scaled)
        assert len(triggers) == len(scaled["triggers"]), f"{name}: a trigger other than redis"
        assert sorted(t["listName"] for t in triggers) == sorted(
            queue_name(model, lane) for model in (served.split(",") if served else models)
        ), f"{name}: one redis trigger per model it serves, on its {lane} list"
        for trigger in triggers:
            assert trigger["passwordFromEnv"] in env_of(container)
            assert re.fullmatch(r"[\w.-]+:\d+", trigger["address"]), trigger["address"]
            assert int(trigger["databaseIndex"]) >= 0 and int(trigger["listLength"]) > 0
    assert BY_KIND[("ScaledObject", "pipeq-worker")]["spec"]["minReplicaCount"] >= 1
    bulk = BY_KIND[("ScaledObject", "pipeq-worker-bulk")]["spec"]
    assert bulk["minReplicaCount"] == 0 and bulk["cooldownPeriod"] > 0
    assert BY_KIND[("Deployment", "pipeq-worker-bulk")]["spec"]["replicas"] == 0
    assert set(LANES) == set(WORKERS.values())
