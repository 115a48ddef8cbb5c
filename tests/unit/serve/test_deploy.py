"""deploy/ checked without docker or kubectl: the manifests parse, point at routes the real app
serves and at each other, the image runs as a non-root user, and its command uses real flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lmforge.serve.settings import ENV_API_KEY, ModelSpec, ServeSettings

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    return docs


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The paths the real app answers (its lifespan, which loads models, is not run)."""
    from starlette.routing import Mount

    from lmforge.serve.server import create_app

    model_dir = tmp_path_factory.mktemp("model")
    app = create_app(ServeSettings(models=[ModelSpec(name="m", path=model_dir)]))
    return {route.path or "/" for route in app.routes if not isinstance(route, Mount)}


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The last Dockerfile instruction of that name with its continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile())
    lines = [line for line in joined.splitlines() if line.startswith(f"{name} ")]
    assert lines, f"the Dockerfile has no {name}"
    return lines[-1][len(name) + 1 :].strip()


def container(manifests: dict[str, dict]) -> dict:
    (server,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def test_probes_point_at_routes_the_app_serves(manifests: dict, app_paths: set[str]) -> None:
    server = container(manifests)
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    port_names = {p["name"] for p in server["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] in app_paths
        assert server[probe]["httpGet"]["port"] in port_names
    assert {"requests", "limits"} <= set(server["resources"])


def test_api_key_comes_from_a_secret(manifests: dict) -> None:
    env = {e["name"]: e for e in container(manifests)["env"]}
    assert "secretKeyRef" in env[ENV_API_KEY]["valueFrom"]
    assert "value" not in env[ENV_API_KEY]


def test_service_and_hpa_target_the_deployment(manifests: dict) -> None:
    deployment, service, hpa = (
        manifests[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler")
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(manifests)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_image_runs_non_root_and_its_healthcheck_is_a_real_route(
    manifests: dict, app_paths: set[str]
) -> None:
    user = instruction("USER").split(":")[0]
    assert user not in {"root", "0"}
    assert (
        int(user)
        == manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )
    health = re.search(
        r"http://127\.0\.0\.1:\$\{LMFORGE_PORT\}(/[\w/-]*)", instruction("HEALTHCHECK")
    )
    assert health and health.group(1) in app_paths
    port = instruction("EXPOSE")
    assert re.search(rf"LMFORGE_PORT={port}\b", dockerfile())
    assert {p["containerPort"] for p in container(manifests)["ports"]} == {int(port)}


def test_image_command_uses_only_real_serve_flags() -> None:
    import typer

    from lmforge.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    options = {opt for param in serve.params for opt in param.opts}
    flags = set(re.findall(r"(--[a-z][a-z-]*)", instruction("CMD")))
    assert flags and flags <= options, f"unknown lmforge serve flags: {flags - options}"
