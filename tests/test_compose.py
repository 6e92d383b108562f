"""The deployment files, checked without a Docker engine: docker-compose.yml against the Compose
Specification's JSON schema, every `pipeq` command in it and in the Dockerfile against the real
argument parser, every PIPEQ_* variable against Settings, and the Dockerfile's build targets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import AliasChoices

from pipeq.cli.main import build_parser
from pipeq.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# Services built from our Dockerfile run pipeq; the others are stock images (redis, minio, mc).
OURS = sorted(name for name, service in SERVICES.items() if "build" in service)


def dockerfile_stages() -> dict[str, list[str]]:
    """Instruction lines of each named stage (continuations and heredoc bodies included)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)\s*$", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def assert_pipeq_command(argv: list[str], where: str) -> None:
    assert argv[:1] == ["pipeq"], f"{where}: {argv} does not run pipeq"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of refusing an unknown subcommand or flag
        pytest.fail(f"{where}: {argv} is not a valid pipeq command (argparse exit {exc.code})")


def settings_env_names() -> set[str]:
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or f"pipeq_{name}"]
        names.update(str(choice).upper() for choice in choices)
    return names


def test_compose_file_follows_the_compose_specification() -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(COMPOSE)
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_rejects_what_compose_would() -> None:
    # Guards the guard: a misspelt service key must fail validation, not pass unnoticed.
    broken = {"services": {"api": {"image": "x", "enviroment": {"A": "1"}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()), jsonschema.Draft7Validator)


@pytest.mark.parametrize("service", OURS)
def test_service_command_is_a_pipeq_command(service: str) -> None:
    command = SERVICES[service].get("command")
    assert isinstance(command, list), f"{service}: give `command` as a list (exec form)"
    assert_pipeq_command(command, f"service {service}")


def test_commented_compose_examples_are_pipeq_commands() -> None:
    pattern = re.compile(r"^\s*#\s+command:\s*(\[.*\])\s*$", re.MULTILINE)
    commented = pattern.findall(COMPOSE_FILE.read_text())
    assert commented, "the per-GPU example's commands were not found"
    for command in commented:
        assert_pipeq_command(json.loads(command), "commented example")


@pytest.mark.parametrize("target", ["worker", "api"])
def test_dockerfile_target_is_non_root_with_healthcheck_and_pipeq_cmd(target: str) -> None:
    lines = dockerfile_stages().get(target)
    assert lines is not None, f"Dockerfile has no `FROM ... AS {target}` stage"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), f"{target}: runs as root"
    assert any(line.startswith("HEALTHCHECK ") for line in lines), f"{target}: no HEALTHCHECK"
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert_pipeq_command(json.loads(cmd.removeprefix("CMD ")), f"Dockerfile target {target}")


@pytest.mark.parametrize("service", OURS)
def test_build_targets_exist_in_the_dockerfile(service: str) -> None:
    build = SERVICES[service]["build"]
    assert build.get("target") in dockerfile_stages(), f"{service}: unknown build target"


def test_pipeq_variables_are_settings_pipeq_reads() -> None:
    # Settings ignores PIPEQ_* names it does not know, so a typo here would pass silently.
    known = settings_env_names()
    for name, service in SERVICES.items():
        environment = service.get("environment") or {}
        keys = [key.split("=")[0].upper() for key in environment]  # a mapping, or KEY=VALUE items
        unknown = sorted(k for k in keys if k.startswith("PIPEQ_") and k not in known)
        assert not unknown, f"service {name}: Settings has no {unknown}"


def test_worker_reserves_gpus() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_only_minio_and_its_init_see_the_root_credentials() -> None:
    # Every other service gets the scoped key minio-init makes (the results bucket only), so a
    # compromised worker cannot administer MinIO or read other buckets.
    root_names = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    for name, service in SERVICES.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        mentions = {key for key in environment if key in root_names}
        mentions |= {
            key for key, value in environment.items() if any(r in str(value) for r in root_names)
        }
        if name in ("minio", "minio-init"):
            assert mentions == root_names, f"{name} needs MinIO's root credentials"
        else:
            assert not mentions, f"service {name} is handed MinIO's root credentials: {mentions}"
    pipeq_env = SERVICES["worker"]["environment"]
    assert pipeq_env["AWS_ACCESS_KEY_ID"] == SERVICES["minio-init"]["environment"]["APP_KEY"]
    assert pipeq_env["AWS_SECRET_ACCESS_KEY"] == SERVICES["minio-init"]["environment"]["APP_SECRET"]


def test_no_secret_has_a_default() -> None:
    """A forgotten .env stops `docker compose up` with a message instead of starting MinIO and
    pipeq with a password everyone can read here."""
    secret = re.compile(r"\$\{(\w*(PASSWORD|SECRET|TOKEN|AUTH)\w*)(:?[-=])")
    assert secret.findall(COMPOSE_FILE.read_text()) == []
    for name in ("MINIO_ROOT_PASSWORD", "PIPEQ_S3_SECRET_KEY", "PIPEQ_FLOWER_BASIC_AUTH"):
        assert f"${{{name}:?" in COMPOSE_FILE.read_text(), name


def test_redis_refuses_writes_at_a_memory_bound_below_its_limit() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1] == "${REDIS_MAXMEMORY:-1gb}"
    assert SERVICES["redis"]["mem_limit"] == "2g"


def test_the_default_registry_is_the_demo_one_written_before_pipeq_starts() -> None:
    env = COMPOSE["x-pipeq-env"]
    assert env["PIPEQ_MODELS"] == "${PIPEQ_MODELS:-/demo/models.yaml}"
    writer = SERVICES["demo-models"]["command"]
    assert writer[-2:] == ["--write-registry", "/demo"]
    for name in ("api", "worker", "flower", "webhooks"):
        needs = SERVICES[name]["depends_on"]["demo-models"]["condition"]
        assert needs == "service_completed_successfully", name
        assert any(v.startswith("demo:/demo") for v in SERVICES[name]["volumes"]), name


def lock_pins(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    pins = [line.split("==") for line in lines if "==" in line and not line.startswith(" ")]
    return {canonical(package): version for package, version in pins}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def test_the_images_install_every_dependency_from_a_lock() -> None:
    """requirements/lock.sh's output pins what pyproject.toml names (torch aside: the worker
    image installs it from the CUDA index first), and the Dockerfile installs from the locks
    without resolving anything else."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = requirement_names(project["dependencies"])
    worker = requirement_names(project["optional-dependencies"]["worker"]) - {"torch"}
    monitor = requirement_names(project["optional-dependencies"]["monitor"])
    assert base | worker <= set(lock_pins("worker.txt")), base | worker - set(
        lock_pins("worker.txt")
    )
    assert base | monitor <= set(lock_pins("api.txt"))
    assert not {p for p in lock_pins("worker.txt") if p.startswith(("torch", "nvidia-"))}
    stages = dockerfile_stages()
    for stage, lock in (("worker-build", "worker.txt"), ("api-build", "api.txt")):
        text = "\n".join(stages[stage])
        assert f"pip install --no-deps -r requirements/{lock}" in text, stage
        assert "pip install --no-deps . && pip check" in text, stage


def test_base_images_are_pinned_by_digest() -> None:
    args = re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert {name for name, _ in args} == {"CUDA_IMAGE", "PYTHON_IMAGE"}
    for name, image in args:
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), name
