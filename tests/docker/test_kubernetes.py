"""The Kubernetes manifests (deploy/kubernetes): valid against the schemas of a fixed Kubernetes
version, wired together as kustomize will apply them, and holding what an operator relies on:
one GPU per worker pod, the compose files' grace period, probes, non-root pods, a dashboard kept
off the network, and migrations done before anything uses the database."""

import os
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed marker
import pytest
import yaml

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.docker.deployment_files import (
        COMPOSE_FILES,
        DOCKER,
        KUBERNETES,
        METRICS_PORT,
        ROOT,
        WORKER_GRACE,
        assert_caviar_command,
        compose,
        seconds,
    )
else:
    from deployment_files import (
        COMPOSE_FILES,
        DOCKER,
        KUBERNETES,
        METRICS_PORT,
        ROOT,
        WORKER_GRACE,
        assert_caviar_command,
        compose,
        seconds,
    )

#: The oldest Kubernetes these manifests are written for; its schemas ship with
#: kubernetes-validate, so validation needs no cluster and no network.
KUBERNETES_VERSION = "1.32"
WAIT_SCRIPT = KUBERNETES / "wait_for_migrations.py"


def kustomization() -> dict:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def manifest_files() -> list[str]:
    return sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[dict]:
    return [
        doc
        for name in kustomization()["resources"]
        for doc in yaml.safe_load_all((KUBERNETES / name).read_text())
        if doc
    ]


def of_kind(kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources() if r["kind"] == kind}


def pod_specs() -> dict[str, dict]:
    """The pod template of every workload (Deployments and the Job), by workload name."""
    workloads = {**of_kind("Deployment"), **of_kind("Job")}
    assert workloads
    return {name: w["spec"]["template"]["spec"] for name, w in workloads.items()}


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def main_container(name: str) -> dict:
    (container,) = pod_specs()[name]["containers"]
    return container


@pytest.mark.parametrize("name", manifest_files())
def test_manifest_follows_the_kubernetes_schemas(name):
    documents = [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    assert documents
    for document in documents:
        # Strict: an unknown or misspelt field is an error, not silently dropped by the API.
        validated = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert validated == KUBERNETES_VERSION


def test_kustomization_applies_every_manifest_and_generates_what_they_reference():
    spec = kustomization()
    assert sorted(spec["resources"]) == manifest_files()
    assert spec["namespace"] in of_kind("Namespace")
    secrets = {g["name"]: g for g in spec["secretGenerator"]}
    config_maps = {g["name"]: g for g in spec["configMapGenerator"]}
    for generator in config_maps.values():
        assert all((KUBERNETES / f).is_file() for f in generator["files"])
    for name, pod in pod_specs().items():
        for container in containers(pod):
            for variable in container.get("env", []):
                if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["name"] in secrets, (name, ref)
                    assert ref["key"] in secret_keys(secrets[ref["name"]]), (name, ref)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, (name, volume)


def secret_keys(generator: dict) -> set[str]:
    """The keys a secretGenerator's env files will hold, read from their committed examples."""
    keys = set()
    for env_file in generator["envs"]:
        example = (KUBERNETES / f"{env_file}.example").read_text()
        keys |= set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    return keys


def test_no_secret_is_committed():
    assert not of_kind("Secret")
    ignored = (KUBERNETES / ".gitignore").read_text().split()
    for generator in kustomization()["secretGenerator"]:
        for env_file in generator["envs"]:
            assert env_file in ignored  # the real file: never committed
            assert "change-me" in (KUBERNETES / f"{env_file}.example").read_text()
    for name, pod in pod_specs().items():
        for container in containers(pod):
            for variable in container.get("env", []):
                if variable["name"] == "CAVIAR_DATABASE_URL":
                    assert "value" not in variable, name  # from the Secret only


def test_each_gpu_worker_pod_owns_one_gpu():
    worker = of_kind("Deployment")["caviar-worker"]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources_ = container["resources"]
    assert resources_["limits"]["nvidia.com/gpu"] == 1
    assert resources_.get("requests", {}).get("nvidia.com/gpu", 1) == 1
    assert all("resources" not in c for c in pod.get("initContainers", []))
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["CAVIAR_REQUIRE_ACCELERATOR"] == "true"
    # A rolling update must not wait for a spare GPU that a fully used cluster lacks.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    others = [c for n, p in pod_specs().items() if n != "caviar-worker" for c in containers(p)]
    assert all("nvidia.com/gpu" not in str(c.get("resources")) for c in others)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_worker_grace_period_matches_compose(name):
    graces = {
        service["stop_grace_period"]
        for service in compose(name)["services"].values()
        if service.get("command", [""])[0] == "worker"
    }
    assert graces == {WORKER_GRACE}
    pod = pod_specs()["caviar-worker"]
    assert pod["terminationGracePeriodSeconds"] == seconds(WORKER_GRACE)


def port_of(container: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    return ports[port] if isinstance(port, str) else port


def listen_port(container: dict) -> int:
    args = container["args"]
    return int(args[args.index("--port") + 1])


@pytest.mark.parametrize("name", ["caviar-api", "caviar-dashboard"])
def test_servers_are_probed_and_served_on_the_port_they_listen_on(name):
    container = main_container(name)
    port = listen_port(container)
    assert "0.0.0.0" in container["args"]  # reachable from the Service, not only the pod
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe].get("httpGet") or container[probe]["tcpSocket"]
        assert port_of(container, check["port"]) == port, probe
    (service,) = [
        s for s in of_kind("Service").values() if s["spec"]["selector"] == pod_labels(name)
    ]
    (service_port,) = service["spec"]["ports"]
    assert port_of(container, service_port["targetPort"]) == port


def test_workers_are_scraped_on_their_metrics_port():
    template = of_kind("Deployment")["caviar-worker"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    container = main_container("caviar-worker")
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["CAVIAR_WORKER_METRICS_PORT"] == str(METRICS_PORT)
    assert env["CAVIAR_WORKER_METRICS_HOST"] == "0.0.0.0"  # reachable from Prometheus' pod
    assert port_of(container, "metrics") == METRICS_PORT
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def pod_labels(name: str) -> dict:
    return of_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]


def test_api_is_ready_when_its_database_is_and_alive_while_it_answers():
    container = main_container("caviar-api")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # database and migrations
    # Liveness never asks the database: an outage must not restart every API pod.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_dashboard_is_reachable_only_through_port_forward_or_chosen_pods():
    assert not of_kind("Ingress")
    for service in of_kind("Service").values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert "externalIPs" not in service["spec"]
    assert all("hostPort" not in str(c) for p in pod_specs().values() for c in containers(p))
    policies = [
        p
        for p in of_kind("NetworkPolicy").values()
        if p["spec"]["podSelector"]["matchLabels"] == pod_labels("caviar-dashboard")
    ]
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "an empty `from` admits every source"
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no ipBlock, no ns
        assert all(peer["podSelector"].get("matchLabels") for peer in rule["from"])


def image_user_id() -> int:
    (uid,) = {
        int(uid)
        for dockerfile in ("Dockerfile", "Dockerfile.cuda")
        for uid in re.findall(r"useradd .*--uid (\d+)", (DOCKER / dockerfile).read_text())
    }
    return uid


def test_pods_run_as_the_images_non_root_user_without_privileges():
    namespace = of_kind("Namespace")[kustomization()["namespace"]]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in pod_specs().items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == image_user_id() != 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        assert all("hostPath" not in volume for volume in pod.get("volumes", [])), name
        for container in containers(pod):
            own = container["securityContext"]
            assert own["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert own["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert not own.get("privileged"), (name, container["name"])
            assert own.get("runAsUser", context["runAsUser"]) != 0, (name, container["name"])


def test_images_are_the_compose_images_of_the_same_command():
    images: dict[str, set[str]] = {}  # caviar subcommand -> image, from the compose files
    for name in COMPOSE_FILES:
        for service in compose(name)["services"].values():
            if "command" in service:
                images.setdefault(service["command"][0], set()).add(service["image"])
    for name, pod in pod_specs().items():
        for container in pod["containers"]:
            assert {container["image"]} == images[container["args"][0]], name
        for container in pod.get("initContainers", []):  # the pod's own image: one pull
            assert container["image"] == pod["containers"][0]["image"], name


def test_every_container_command_is_a_caviar_command():
    for name, pod in pod_specs().items():
        for container in pod["containers"]:
            assert "command" not in container  # the image's entrypoint: caviar
            assert_caviar_command(name, container["args"])


def test_migrations_run_once_in_the_job_and_every_other_pod_waits_for_them():
    pods = pod_specs()
    (job,) = of_kind("Job").values()
    assert main_container(job["metadata"]["name"])["args"] == ["db", "upgrade"]
    assert job["spec"]["backoffLimit"] > 0  # PostgreSQL may not answer at first
    mounted_script = None
    for name in of_kind("Deployment"):
        pod = pods[name]
        assert "db" not in pod["containers"][0]["args"], name  # no DDL outside the Job
        first = pod["initContainers"][0]
        script = first["command"][-1]
        mounts = {m["mountPath"]: m["name"] for m in first["volumeMounts"]}
        directory, file = script.rsplit("/", 1)
        volume = {v["name"]: v for v in pod["volumes"]}[mounts[directory]]
        assert file == WAIT_SCRIPT.name
        assert file in generated_files(volume["configMap"]["name"]), name
        mounted_script = mounted_script or first["command"]
        assert first["command"] == mounted_script, name  # the same wait everywhere


def generated_files(config_map: str) -> list[str]:
    (generator,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == config_map]
    return generator["files"]


def test_wait_for_migrations_blocks_until_the_database_is_upgraded(tmp_path):
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": f"sqlite:///{tmp_path / 'caviar.db'}",
        "PYTHONPATH": str(ROOT),
    }
    waiter = subprocess.Popen(
        [sys.executable, str(WAIT_SCRIPT), "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert waiter.stdout is not None
    try:
        assert "caviar db upgrade" in waiter.stdout.readline()
        time.sleep(1)
        assert waiter.poll() is None  # still waiting on an empty database
        upgrade = subprocess.run(
            [sys.executable, "-m", "caviar.service.cli", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert upgrade.returncode == 0, upgrade.stderr
        output, _ = waiter.communicate(timeout=60)
    finally:
        waiter.kill()
        waiter.wait()
    assert waiter.returncode == 0 and "database is current" in output
