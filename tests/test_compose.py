"""The real deployment, checked statically: docker-compose.yml, the image, Prometheus, Grafana.

No Docker engine is needed (none exists on the development machines): the files are parsed,
the Compose file is validated against the Compose specification's JSON schema, and the
project's own expectations are checked one by one. Each check is a function returning its
problems, so every check is also run on a deliberately broken copy to prove it can fail.

tests/compose-spec.json is the compose-spec project's schema/compose-spec.json, taken verbatim
from the npm package dclint 3.1.0 (schemas/compose.schema.json, published 2026-03-24), the
newest copy of the schema found in a package registry; refresh it from a newer dclint release
(`npm pack dclint`) or from the compose-spec repository.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from compose_checks import (
    COUNTERS_AND_GAUGES,
    DASHBOARD,
    DOCKERFILE,
    GRAFANA_DATASOURCE,
    GRAFANA_PROVIDER,
    HISTOGRAMS,
    PROMETHEUS,
    ROOT,
    SENTINEL_MASTER,
    MissingVariable,
    api_problems,
    command_problems,
    dashboard_metrics,
    dashboard_problems,
    default_model_problems,
    dockerfile_problems,
    env_example_problems,
    flower_problems,
    gpu_problems,
    grafana_problems,
    ha_problems,
    interpolate,
    load_compose,
    load_env_example,
    prometheus_problems,
    qdrant_problems,
    redis_env_problems,
    redis_problems,
    resilience_problems,
    schema_problems,
    secret_problems,
    service_problems,
    volume_problems,
    worker_env_problems,
)

# --- the real files pass every check ----------------------------------------------------------

COMPOSE_CHECKS = [
    schema_problems,
    service_problems,
    redis_problems,
    gpu_problems,
    qdrant_problems,
    worker_env_problems,
    redis_env_problems,
    ha_problems,
    command_problems,
    flower_problems,
    api_problems,
    default_model_problems,
    secret_problems,
    volume_problems,
    resilience_problems,
]


@pytest.mark.parametrize("check", COMPOSE_CHECKS, ids=lambda c: c.__name__)
def test_compose_file(check):
    assert check(load_compose()) == []


def test_env_example_covers_every_required_variable():
    assert env_example_problems(load_compose(), load_env_example()) == []


def test_compose_refuses_to_start_without_secrets():
    compose, env = load_compose(), load_env_example()
    interpolate(compose, env)  # complete: no error
    for secret in ("REDIS_PASSWORD", "QDRANT_API_KEY", "FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        without = {k: v for k, v in env.items() if k != secret}
        with pytest.raises(MissingVariable, match=secret):
            interpolate(compose, without)
        with pytest.raises(MissingVariable, match=secret):
            interpolate(compose, {**without, secret: ""})


def test_prometheus_config():
    assert prometheus_problems(load_compose(), yaml.safe_load(PROMETHEUS.read_text())) == []


def test_grafana_provisioning_and_dashboard():
    datasources = yaml.safe_load(GRAFANA_DATASOURCE.read_text())
    provider = yaml.safe_load(GRAFANA_PROVIDER.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    assert grafana_problems(load_compose(), datasources, provider) == []
    assert dashboard_problems(dashboard, datasources["datasources"][0]["uid"]) == []
    assert dashboard_metrics(dashboard) >= {
        "reprise_jobs_total",
        "reprise_job_end_to_end_seconds_bucket",
        "reprise_queue_depth",
        "reprise_device_busy_ratio",
    }


def test_dashboard_metrics_are_exported_by_the_code():
    """The fixed names above must be what the worker and the coordinator really export."""
    source = "\n".join(
        path.read_text() for folder in ("workers", "scheduler") for path in (ROOT / folder).rglob("*.py")
    )
    for metric in sorted(COUNTERS_AND_GAUGES | HISTOGRAMS):
        # prometheus_client adds _total to a counter's name.
        names = {metric, metric.removesuffix("_total")}
        assert any(f'"{name}"' in source for name in names), f"{metric} is exported by no module"


def test_dockerfile():
    assert dockerfile_problems(load_compose(), DOCKERFILE.read_text()) == []
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and ".env" in ignored


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$SET $SET", env) == "x d  d $SET x"
    with pytest.raises(MissingVariable, match="UNSET: say so"):
        interpolate("${UNSET:?say so}", env)


# --- and each check can fail --------------------------------------------------------------------


def _set(path: str, value):
    """A mutation that sets compose[a][b]... = value (value None deletes)."""

    def mutate(doc):
        *parents, last = path.split("/")
        for key in parents:
            doc = doc[key]
        if value is None:
            del doc[last]
        else:
            doc[last] = value

    return mutate


COMPOSE_MUTATIONS = [
    (schema_problems, "unknown service key", _set("services/worker-gpu0/gpu_ids", ["0"])),
    (
        schema_problems,
        "unknown depends_on condition",
        _set("services/flower/depends_on/redis/condition", "service_ready"),
    ),
    (service_problems, "no grafana", _set("services/grafana", None)),
    (redis_problems, "no AOF", _set("services/redis/command", "redis-server --requirepass ${REDIS_PASSWORD:?x}")),
    (
        redis_problems,
        "literal password",
        _set("services/redis/command", "redis-server --appendonly yes --requirepass hunter2"),
    ),
    (
        gpu_problems,
        "two workers on one GPU",
        _set(
            "services/worker-gpu1/deploy/resources/reservations/devices",
            [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}],
        ),
    ),
    (gpu_problems, "worker without a GPU", _set("services/worker-gpu1/deploy", {})),
    (qdrant_problems, "cluster off", _set("services/qdrant2/environment/QDRANT__CLUSTER__ENABLED", "false")),
    (qdrant_problems, "no bootstrap", _set("services/qdrant3/command", ["./qdrant"])),
    (qdrant_problems, "shared storage", _set("services/qdrant2/volumes", ["qdrant1-data:/qdrant/storage"])),
    (
        worker_env_problems,
        "replication 1",
        _set("services/worker-gpu0/environment/REPRISE_CACHE_REPLICATION_FACTOR", "1"),
    ),
    (worker_env_problems, "metrics on loopback", _set("services/worker-gpu1/environment/REPRISE_METRICS_ADDR", None)),
    (
        worker_env_problems,
        "artifacts off the volume",
        _set("services/worker-gpu1/environment/REPRISE_ARTIFACT_URL", "/tmp/a"),
    ),
    (command_problems, "entrypoint given twice", _set("services/worker-gpu0/command", ["reprise", "worker"])),
    (command_problems, "flower on loopback", _set("services/flower/command", ["flower"])),
    (command_problems, "no standby", _set("services/coordinator/deploy", {"replicas": 1})),
    (api_problems, "api on loopback", _set("services/api/command", ["api", "--port", "8000"])),
    (api_problems, "api without the artifacts", _set("services/api/volumes", [])),
    (api_problems, "api published on every interface", _set("services/api/ports", ["8000:8000"])),
    (redis_env_problems, "api without a password", _set("services/api/environment/REPRISE_REDIS_PASSWORD", None)),
    (api_problems, "api healthcheck elsewhere", _set("services/api/healthcheck/test", ["CMD", "true"])),
    (default_model_problems, "api routes to tiny", _set("services/api/environment/REPRISE_DEFAULT_MODEL", None)),
    (flower_problems, "no basic auth", _set("services/flower/environment/REPRISE_FLOWER_PASSWORD", None)),
    (default_model_problems, "flower routes to tiny", _set("services/flower/environment/REPRISE_DEFAULT_MODEL", None)),
    (
        default_model_problems,
        "default not served",
        _set("services/coordinator/environment/REPRISE_DEFAULT_MODEL", "sd15"),
    ),
    (
        secret_problems,
        "literal Grafana password",
        _set("services/grafana/environment/GF_SECURITY_ADMIN_PASSWORD", "admin"),
    ),
    (
        secret_problems,
        "defaulted secret",
        _set("services/flower/environment/REDIS_URL", "redis://:${REDIS_PASSWORD:-x}@redis:6379/0"),
    ),
    (
        redis_env_problems,
        "literal Redis address",
        _set("services/worker-gpu0/environment/REDIS_URL", "redis://redis:6379/0"),
    ),
    (redis_env_problems, "no password", _set("services/coordinator/environment/REPRISE_REDIS_PASSWORD", None)),
    (redis_env_problems, "other master", _set("services/flower/environment/REPRISE_REDIS_SENTINEL_MASTER", "x")),
    (ha_problems, "no replica", _set("services/redis-replica", None)),
    (ha_problems, "a sentinel missing", _set("services/sentinel3", None)),
    (
        ha_problems,
        "quorum 1",
        _set(
            "services/sentinel2/command",
            ["sh", "-c", "printf 'sentinel monitor reprise redis 6379 1' > c; exec redis-sentinel c"],
        ),
    ),
    (ha_problems, "sentinels share a volume", _set("services/sentinel2/volumes", ["sentinel1-data:/data"])),
    (ha_problems, "replica of nothing", _set("services/redis-replica/command", "redis-server --appendonly yes")),
    (volume_problems, "undeclared volume", _set("volumes/grafana-data", None)),
    (resilience_problems, "no healthcheck", _set("services/redis/healthcheck", None)),
    (resilience_problems, "no restart policy", _set("services/flower/restart", None)),
]


def _mutated(mutate):
    doc = load_compose()
    # Anchors and merge keys share objects between services: break that before mutating one.
    doc = json.loads(json.dumps(doc))
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    "check,mutate",
    [(c, m) for c, _, m in COMPOSE_MUTATIONS],
    ids=[f"{c.__name__}-{why}" for c, why, _ in COMPOSE_MUTATIONS],
)
def test_compose_check_catches(check, mutate):
    assert check(_mutated(mutate))


def test_every_compose_check_is_exercised():
    assert {c for c, _, _ in COMPOSE_MUTATIONS} == set(COMPOSE_CHECKS)


def test_env_example_check_catches():
    compose, example = load_compose(), load_env_example()
    assert env_example_problems(compose, {k: v for k, v in example.items() if k != "QDRANT_API_KEY"})
    assert env_example_problems(compose, {**example, "REDIS_PASSWORD": "s3cret-real"})


def test_prometheus_check_catches():
    compose, config = load_compose(), yaml.safe_load(PROMETHEUS.read_text())
    broken = copy.deepcopy(config)
    broken["scrape_configs"] = [j for j in broken["scrape_configs"] if j["job_name"] != "reprise-coordinator"]
    assert any("coordinator" in p for p in prometheus_problems(compose, broken))
    broken = copy.deepcopy(config)
    for job in broken["scrape_configs"]:
        for sc in job.get("static_configs", []):
            sc["targets"] = [t.replace(":9101", ":9100") for t in sc["targets"]]
    assert any("worker targets" in p for p in prometheus_problems(compose, broken))
    broken = copy.deepcopy(config)
    broken["scrape_configs"].append({"job_name": "x", "static_configs": [{"targets": ["nowhere:1"]}]})
    assert prometheus_problems(compose, broken)


def test_dashboard_check_catches():
    dashboard = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]["uid"]
    broken = copy.deepcopy(dashboard)
    broken["panels"][1]["targets"][0]["expr"] = "sum(rate(reprise_jobs_completed[5m]))"
    assert any("reprise_jobs_completed" in p for p in dashboard_problems(broken, uid))
    broken = copy.deepcopy(dashboard)
    broken["panels"] = [p for p in broken["panels"] if "evictions" not in p.get("title", "").lower()]
    assert any("evictions" in p for p in dashboard_problems(broken, uid))
    assert dashboard_problems(dashboard, "another-uid")
    broken = copy.deepcopy(dashboard)
    broken["panels"][-1]["gridPos"] = dict(broken["panels"][-2]["gridPos"])
    assert any("overlaps" in p for p in dashboard_problems(broken, uid))


def test_grafana_check_catches():
    compose = load_compose()
    datasources = yaml.safe_load(GRAFANA_DATASOURCE.read_text())
    provider = copy.deepcopy(yaml.safe_load(GRAFANA_PROVIDER.read_text()))
    provider["providers"][0]["options"]["path"] = "/var/lib/grafana/dashboards"
    assert grafana_problems(compose, datasources, provider)


def test_dockerfile_check_catches():
    compose, text = load_compose(), DOCKERFILE.read_text()
    assert dockerfile_problems(compose, text.replace('ENTRYPOINT ["reprise"]', 'ENTRYPOINT ["celery"]'))
    assert dockerfile_problems(compose, text.replace("USER reprise", "USER root"))
    assert dockerfile_problems(compose, text.replace("FROM python:3.11-slim", "FROM ubuntu:24.04"))
    assert dockerfile_problems(compose, text.replace("HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"))


@pytest.mark.integration
def test_the_ha_profiles_sentinel_command_runs_and_watches_the_master(tmp_path):
    """The sentinels' shell command from docker-compose.yml, run as written (Compose's `$$` unescaped, the
    service names and the /data volume mapped onto this machine) with Debian's redis-sentinel against a real
    redis-server: it writes its configuration once, starts, and watches the master with the password."""
    import shutil
    import subprocess
    import time

    import redis

    from ops.localcluster import RedisServer, free_port

    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed (.ci/run installs it)")
    password = "compose-check-" + str(free_port())
    master = RedisServer(directory=str(tmp_path / "m")).start()
    redis.Redis.from_url(master.url).config_set("requirepass", password)
    sentinel_port = free_port()
    argv = load_compose()["services"]["sentinel1"]["command"]
    script = (
        argv[2]
        .replace("$$", "$")
        .replace("/data/", f"{tmp_path}/")
        .replace("redis 6379", f"127.0.0.1 {master.port}")
        .replace("'port 26379'", f"'port {sentinel_port}'")
    )
    proc = subprocess.Popen(argv[:2] + [script], env={"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password})
    try:
        deadline, info = time.monotonic() + 20, {}
        while time.monotonic() < deadline and not info.get("runid"):  # known only from an authenticated INFO
            try:
                info = redis.Redis(port=sentinel_port, socket_timeout=1).sentinel_master(SENTINEL_MASTER)
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.2)
        assert int(info["port"]) == master.port and "master" in info["flags"]
        assert info.get("runid") == redis.Redis.from_url(master.url, password=password).info("server")["run_id"]
        assert f"auth-pass {SENTINEL_MASTER} {password}" in (tmp_path / "sentinel.conf").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        master.stop()
