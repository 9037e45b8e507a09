"""The container images, the compose file and the Kubernetes manifests (deploy/docker, deploy/compose,
deploy/kubernetes) are checked without a container runtime or a cluster: YAML that parses, every command
line accepted by the real ``sealedml`` parser, images, ports, volumes and probes that fit together, the
manifests valid against the Kubernetes schemas (kubernetes-validate), and ``docker compose config`` where
a Compose plugin is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealedml.cli.main import build_parser
from tests.unit.test_deploy_files import _dockerfile_instructions

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "sealedml.yaml"


def _exec_form(path: Path, word: str) -> list[str]:
    (rest,) = [rest for w, rest in _dockerfile_instructions(path) if w == word]
    value: list[str] = json.loads(rest)
    return value


def _parses(argv: list[str]) -> Any:
    """``argv`` as the real CLI reads it (argparse exits on an unknown flag)."""
    args = build_parser().parse_args(argv)
    assert getattr(args, "func", None) is not None, argv
    return args


# ---------------------------------------------------------------------------- images


def test_the_images_install_the_package_and_run_sealedml():
    for name in ("keyservice", "runtime"):
        path = DOCKER / f"{name}.Dockerfile"
        instructions = _dockerfile_instructions(path)
        assert instructions[0] == ("FROM", "python:3.11-slim")
        assert ("RUN", "pip install . && rm -rf /build") in instructions  # no extras: no scikit-learn
        assert any(w == "USER" for w, _ in instructions)
    keyservice = _exec_form(DOCKER / "keyservice.Dockerfile", "ENTRYPOINT")
    assert _parses(keyservice[3:]).port == 8700
    runtime = _exec_form(DOCKER / "runtime.Dockerfile", "ENTRYPOINT") + _exec_form(DOCKER / "runtime.Dockerfile", "CMD")
    assert runtime[:3] == ["python", "-m", "sealedml"] and _parses(runtime[3:]).port == 8701
    gramine = _dockerfile_instructions(DOCKER / "runtime-gramine.Dockerfile")
    assert gramine[0][1].startswith("gramineproject/gramine:")
    assert json.loads(dict(gramine)["ENTRYPOINT"]) == ["gramine-sgx", "sealedml-worker"]


# ---------------------------------------------------------------------------- compose


def test_the_compose_file_starts_a_keyservice_and_a_gateway_that_find_each_other():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"keyservice", "gateway"}
    for service in services.values():
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve().is_file()
        for volume in service["volumes"]:
            assert volume.split(":")[0] in compose["volumes"], volume
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    keyservice = _parses(
        _exec_form(DOCKER / "keyservice.Dockerfile", "ENTRYPOINT")[3:] + services["keyservice"]["command"]
    )
    gateway = _parses(services["gateway"]["command"])
    assert gateway.keyservice == f"http://keyservice:{keyservice.port}"
    assert services["keyservice"]["ports"] == [f"127.0.0.1:{keyservice.port}:{keyservice.port}"]
    assert services["gateway"]["ports"] == [f"127.0.0.1:{gateway.port}:{gateway.port}"]
    assert services["gateway"]["depends_on"]["keyservice"]["condition"] == "service_healthy"
    # the simulated TEE's one root is shared; the store is a volume of its own
    assert "simulated-root:/var/lib/sealedml/home" in services["keyservice"]["volumes"]
    assert "simulated-root:/var/lib/sealedml/home" in services["gateway"]["volumes"]
    assert gateway.store == Path("/models") and "models:/models" in services["gateway"]["volumes"]


def test_docker_compose_config_accepts_the_file_where_compose_is_installed():
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60) if docker else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no Docker Compose plugin here: the parse-based checks above still ran")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- kubernetes


def _manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text()) if doc]


def test_the_manifests_are_valid_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in _manifests():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] in ("Deployment", "StatefulSet")}


def test_every_container_has_probes_on_its_port_and_a_command_sealedml_accepts():
    images = {"keyservice": DOCKER / "keyservice.Dockerfile"}
    for name, workload in _workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
            entry = _exec_form(images[name], "ENTRYPOINT")[3:] if name in images else []
            args = _parses(entry + container["args"])
            assert args.port == ports["http"], name
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])} | claims, name


def test_services_claims_and_urls_fit_together():
    docs = _manifests()
    workloads = _workloads()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, service in services.items():
        selected = [
            w for w in workloads.values()
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert len(selected) == 1, name
        (port,) = service["spec"]["ports"]
        container_ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert port["targetPort"] in container_ports, name
    for workload in workloads.values():
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    gateway = _parses(workloads["gateway"]["spec"]["template"]["spec"]["containers"][0]["args"])
    namespace = "sealedml"
    ks_port = services["keyservice"]["spec"]["ports"][0]["port"]
    ex_port = services["executor"]["spec"]["ports"][0]["port"]
    assert gateway.keyservice == f"http://keyservice.{namespace}.svc:{ks_port}"
    assert gateway.executor == f"http://executor.{namespace}.svc:{ex_port}"
    assert {d["metadata"].get("namespace", namespace) for d in docs if d["kind"] != "Namespace"} == {namespace}
