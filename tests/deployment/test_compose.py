"""The compose files: valid for a real compose implementation, and wired consistently."""

from __future__ import annotations

import re
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deployment.conftest import ROOT, SECRETS, compose, resolved

PUBLISHED = {"api": 8000, "dashboard": 8080, "prometheus": 9090, "grafana": 3000}
"""The only services that publish a port, and the port each publishes."""
RAY_NODES = ("ray-head", "ray-worker")


def flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in an exec-form command."""
    for i, word in enumerate(command):
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
        if word == f"--{name}":
            return command[i + 1]
    raise AssertionError(f"--{name} missing from {command}")


def test_both_files_are_valid_compose(gpu_config, cpu_config):
    assert set(gpu_config["services"]) == {
        "postgres", "migrate", "ray-head", "ray-worker", "api", "dashboard", "prometheus", "grafana"
    }  # fmt: skip
    assert set(cpu_config["services"]) == set(gpu_config["services"]) | {"ray-cpu-worker"}


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_every_secret_must_be_set_and_compose_names_it(secret):
    env = {k: v for k, v in SECRETS.items() if k != secret}
    result = compose("docker-compose.yml", env=env, check=False)
    assert result.returncode != 0 and f"set {secret}" in result.stderr


def test_only_the_user_facing_services_publish_ports_and_on_loopback_by_default(gpu_config, cpu_config):
    for config in (gpu_config, cpu_config):
        for name, service in config["services"].items():
            ports = service.get("ports", [])
            if name not in PUBLISHED:
                assert not ports, f"{name} must not publish {ports}"  # database and Ray stay internal
                continue
            [port] = ports
            assert re.fullmatch(rf"127\.0\.0\.1:\d+:{PUBLISHED[name]}(/tcp)?", str(port)), port


def test_the_bind_address_ports_and_cpu_workers_come_from_the_environment():
    config = resolved("docker-compose.yml", ESGD_BIND="0.0.0.0", ESGD_API_PORT="9000")
    assert config["services"]["api"]["ports"] == ["0.0.0.0:9000:8000/tcp"]
    config = resolved("docker-compose.yml", "docker-compose.cpu.yml", RAY_WORKERS="3", RAY_WORKER_CPUS="4")
    assert config["services"]["ray-cpu-worker"]["deploy"]["replicas"] == 3
    assert config["services"]["ray-cpu-worker"]["deploy"]["resources"]["limits"]["cpus"] == 4


def test_gpu_workers_reserve_gpus_and_the_cpu_override_replaces_them(gpu_config, cpu_config):
    devices = gpu_config["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "gpu" in str(gpu_config["services"]["ray-worker"]["build"]["args"]["TORCH_VARIANT"])
    assert cpu_config["services"]["ray-worker"]["deploy"]["replicas"] == 0
    cpu_worker = cpu_config["services"]["ray-cpu-worker"]
    assert "reservations" not in cpu_worker["deploy"]["resources"]
    assert cpu_worker["deploy"]["resources"]["limits"]["cpus"] == 2  # Ray counts the limit, not the host
    assert cpu_worker["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert cpu_worker["command"] == gpu_config["services"]["ray-worker"]["command"]
    assert cpu_worker["environment"] == gpu_config["services"]["ray-worker"]["environment"]


def test_ray_nodes_api_and_metrics_agree_on_addresses_and_the_token(gpu_config):
    services = gpu_config["services"]
    head = services["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert flag(head, "num-cpus") == "0"  # trials run on workers; drivers on the head
    worker = services["ray-worker"]["command"]
    assert flag(worker, "address") == f"ray-head:{flag(head, 'port')}"
    assert services["api"]["environment"]["RAY_ADDRESS"] == f"http://ray-head:{flag(head, 'dashboard-port')}"
    for name in (*RAY_NODES, "api"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == SECRETS["RAY_AUTH_TOKEN"]
    prometheus = yaml.safe_load((ROOT / "dashboards/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["esgd-api"]["static_configs"][0]["targets"] == [f"api:{PUBLISHED['api']}"]
    [ray_sd] = jobs["ray"]["dns_sd_configs"]
    assert set(ray_sd["names"]) >= {*RAY_NODES, "ray-cpu-worker"}
    for name in RAY_NODES:
        assert flag(services[name]["command"], "metrics-export-port") == str(ray_sd["port"])


def test_the_databases_are_apart_and_every_process_uses_the_same_ones(gpu_config):
    services = gpu_config["services"]
    postgres = services["postgres"]["environment"]
    initdb = (ROOT / "service/deploy/initdb/10-optuna-database.sql").read_text()
    created = {postgres["POSTGRES_DB"], *re.findall(r"CREATE DATABASE (\w+)", initdb)}
    urls = {name: services[name]["environment"] for name in ("migrate", "api", "dashboard")}
    for env in urls.values():
        assert env["ESGD_DATABASE_URL"] == urls["migrate"]["ESGD_DATABASE_URL"]
        assert env["ESGD_OPTUNA_STORAGE_URL"] == urls["migrate"]["ESGD_OPTUNA_STORAGE_URL"]
    service_db, optuna_db = (
        urlsplit(urls["api"][key]) for key in ("ESGD_DATABASE_URL", "ESGD_OPTUNA_STORAGE_URL")
    )
    assert {service_db.path[1:], optuna_db.path[1:]} == created and service_db.path != optuna_db.path
    for url in (service_db, optuna_db):
        assert (url.hostname, url.port, url.username) == ("postgres", 5432, postgres["POSTGRES_USER"])
        assert url.password == SECRETS["POSTGRES_PASSWORD"]
    assert f"{ROOT}/service/deploy/initdb:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]


def test_start_order_migrate_first_then_api_and_dashboard(gpu_config):
    services = gpu_config["services"]
    assert services["migrate"]["command"] == ["esgd", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["api"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "ray-head": {"condition": "service_healthy"},
    }
    assert services["dashboard"]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert services["api"]["command"][:2] == ["esgd", "serve"]
    assert services["api"]["environment"]["ESGD_WORKERS"] == "2"  # one of them leads the scheduler
    assert services["dashboard"]["command"][:2] == ["esgd", "dashboard"]
    for name, service in services.items():
        if name != "migrate":
            assert service["healthcheck"]["test"][0] == "CMD", name
            assert service["restart"] == "unless-stopped", name


def test_drivers_on_the_head_and_the_api_share_the_artifacts(gpu_config):
    services = gpu_config["services"]

    def artifacts(name: str) -> list[str]:
        return [v for v in services[name]["volumes"] if v.startswith("artifacts:")]

    assert artifacts("api") == artifacts("ray-head") == ["artifacts:/data/artifacts:rw"]


def test_the_image_runs_as_a_user_with_pinned_dependencies():
    dockerfile = (ROOT / "service/deploy/Dockerfile").read_text()
    assert re.search(r"^USER esgd$", dockerfile, re.M)
    assert dockerfile.count("torch==2.13.0") == 2  # both variants, same release as pyproject.toml
    assert "HEALTHCHECK" in dockerfile
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "service/deploy/constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        name = re.match(r"[A-Za-z0-9_.-]+", dependency).group().lower().replace("_", "-")
        assert name == "torch" or name in pins, f"{name} is not pinned in constraints.txt"
