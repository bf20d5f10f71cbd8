"""The checks of the real deployment files (docker-compose.yml, the image, Prometheus, Grafana): loading
and interpolating them as Compose does, and one function per expectation returning its problems.
tests/test_compose.py runs each on the real files and on a deliberately broken copy."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "compose-spec.json"
ENV_EXAMPLE = ROOT / "ops" / "compose.env.example"
DOCKERFILE = ROOT / "ops" / "docker" / "Dockerfile"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "ops" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "reprise.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "reprise.json"

SERVICES = {
    "redis",
    "qdrant1",
    "qdrant2",
    "qdrant3",
    "worker-gpu0",
    "worker-gpu1",
    "flower",
    "api",
    "coordinator",
    "prometheus",
    "grafana",
}
WORKER_METRICS_PORT, COORDINATOR_METRICS_PORT = 9101, 9102

# The metric names fixed by the metrics layer (workers and coordinator).
COUNTERS_AND_GAUGES = {
    "reprise_jobs_total",
    "reprise_cache_hits_total",
    "reprise_steps_saved_total",
    "reprise_gpu_seconds_saved_total",
    "reprise_cache_writeback_failures_total",
    "reprise_queue_depth",
    "reprise_device_busy_ratio",
    "reprise_cache_generation",
    "reprise_cache_entries",
    "reprise_cache_bytes",
    "reprise_evictions_total",
    "reprise_sweeps_total",
    "reprise_leader_changes_total",
    "reprise_coordinator_is_leader",
}
HISTOGRAMS = {
    "reprise_job_queue_wait_seconds",
    "reprise_job_service_seconds",
    "reprise_job_end_to_end_seconds",
    "reprise_cache_lookup_seconds",
}
DASHBOARD_TOPICS = (
    "throughput",
    "p50",
    "p95",
    "p99",
    "queue depth",
    "hit rate by type",
    "steps",
    "evictions",
    "generation",
    "device busy",
)

SECRET_NAME = re.compile(r"PASSWORD|API_KEY|SECRET|TOKEN|REDISCLI_AUTH")
REQUIREPASS = r"--requirepass\s+(\$\{[^}]*\}|\S+)"
REQUIRED_REF = re.compile(r"^\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
# $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, $VAR
VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# --- loading ----------------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def load_env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


class MissingVariable(KeyError):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution, enough for this file: defaults, required, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        present = name in env and (env[name] != "" or op in (None, "-", "?"))
        if op in (":?", "?") and not present:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and not present:
            return arg
        return env.get(name, "")

    return VARIABLE.sub(substitute, value)


def walk_strings(value, path=""):
    """Every string in a parsed document, with where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk_strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk_strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_text(service: dict) -> str:
    command = service.get("command") or ""
    return shlex.join(command) if isinstance(command, list) else command


def worker_names(compose: dict) -> list[str]:
    return sorted(name for name in compose["services"] if name.startswith("worker-"))


def named_volume_mounts(service: dict) -> dict[str, str]:
    """target -> named volume (bind mounts, which start with . or /, left out)."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source and not source.startswith((".", "/", "~")):
            mounts[target] = source
    return mounts


def bind_mounts(service: dict) -> dict[str, str]:
    """host path (relative to the repository) -> target."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str) and volume.startswith("./"):
            source, target = volume.split(":")[:2]
            mounts[source[2:]] = target
    return mounts


# --- the checks: each returns a list of problems ----------------------------------------------


def schema_problems(compose: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    resolved = interpolate(compose, load_env_example())
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(resolved)]


def service_problems(compose: dict) -> list[str]:
    missing = SERVICES - set(compose.get("services", {}))
    return [f"missing service {name}" for name in sorted(missing)]


def redis_problems(compose: dict) -> list[str]:
    redis = compose["services"]["redis"]
    text = command_text(redis)
    problems = []
    if not re.search(r"--appendonly\s+yes\b", text):
        problems.append("redis: no --appendonly yes")
    password = re.search(REQUIREPASS, text)
    if not password or not REQUIRED_REF.match(password[1]):
        problems.append("redis: --requirepass must be ${VAR:?...}")
    if "/data" not in named_volume_mounts(redis):
        problems.append("redis: /data is not on a named volume")
    return problems


def gpu_problems(compose: dict) -> list[str]:
    problems, seen = [], {}
    workers = worker_names(compose)
    if len(workers) < 2:
        problems.append(f"expected a worker per GPU, found {workers}")
    for name in workers:
        devices = (
            compose["services"][name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        )
        ids = [
            i
            for d in devices
            if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
            for i in d.get("device_ids", [])
        ]
        if len(ids) != 1:
            problems.append(f"{name}: reserves {ids or 'no'} nvidia GPU device ids, expected exactly one")
        for i in ids:
            if i in seen:
                problems.append(f"{name}: GPU {i} is already reserved by {seen[i]}")
            seen[i] = name
        args = shlex.split(command_text(compose["services"][name]))
        if "--devices" not in args or args[args.index("--devices") + 1] != "cuda:0":
            problems.append(f"{name}: the one GPU a container sees is cuda:0; pass --devices cuda:0")
    return problems


def qdrant_problems(compose: dict) -> list[str]:
    problems = []
    nodes = sorted(n for n in compose["services"] if re.fullmatch(r"qdrant\d+", n))
    if len(nodes) < 3:
        problems.append(f"expected a 3-node Qdrant cluster, found {nodes}")
    volumes = set()
    for name in nodes:
        service = compose["services"][name]
        env = environment(service)
        if env.get("QDRANT__CLUSTER__ENABLED") != "true":
            problems.append(f"{name}: QDRANT__CLUSTER__ENABLED is not true")
        if not REQUIRED_REF.match(env.get("QDRANT__SERVICE__API_KEY", "")):
            problems.append(f"{name}: QDRANT__SERVICE__API_KEY must be ${{VAR:?...}}")
        args = shlex.split(command_text(service))
        flag = "--uri" if name == "qdrant1" else "--bootstrap"
        if flag not in args or args[args.index(flag) + 1] != "http://qdrant1:6335":
            problems.append(f"{name}: expected {flag} http://qdrant1:6335")
        storage = named_volume_mounts(service).get("/qdrant/storage")
        if storage is None or storage in volumes:
            problems.append(f"{name}: needs its own named volume at /qdrant/storage")
        volumes.add(storage)
    return problems


def worker_env_problems(compose: dict) -> list[str]:
    problems, artifact_volumes = [], set()
    for name in [*worker_names(compose), "coordinator"]:
        service = compose["services"][name]
        env = environment(service)
        if env.get("REPRISE_CACHE_REPLICATION_FACTOR") != "2":
            problems.append(f"{name}: REPRISE_CACHE_REPLICATION_FACTOR is not 2")
        if not re.fullmatch(r"http://qdrant\d+:6333", env.get("QDRANT_URL", "")):
            problems.append(f"{name}: QDRANT_URL does not point at a Qdrant node")
        if not REQUIRED_REF.match(env.get("QDRANT_API_KEY", "")):
            problems.append(f"{name}: QDRANT_API_KEY must be ${{VAR:?...}}")
        if name.startswith("worker-"):
            artifacts = env.get("REPRISE_ARTIFACT_URL", "")
            volume = named_volume_mounts(service).get(artifacts)
            if volume is None:
                problems.append(f"{name}: REPRISE_ARTIFACT_URL {artifacts!r} is not a named volume's mount")
            if volume:
                artifact_volumes.add(volume)
            if env.get("REPRISE_METRICS_PORT") != str(WORKER_METRICS_PORT):
                problems.append(f"{name}: REPRISE_METRICS_PORT is not {WORKER_METRICS_PORT}")
            if env.get("REPRISE_METRICS_ADDR") != "0.0.0.0":
                problems.append(
                    f"{name}: metrics listen on loopback only (REPRISE_METRICS_ADDR), Prometheus cannot scrape"
                )
    if len(artifact_volumes) > 1:
        problems.append(f"workers write artifacts to different volumes: {sorted(map(str, artifact_volumes))}")
    coordinator_port = environment(compose["services"]["coordinator"]).get("REPRISE_COORDINATOR_METRICS_PORT")
    if coordinator_port != str(COORDINATOR_METRICS_PORT):
        problems.append(f"coordinator: REPRISE_COORDINATOR_METRICS_PORT is not {COORDINATOR_METRICS_PORT}")
    return problems


def redis_env_problems(compose: dict) -> list[str]:
    """Every process of ours reaches Redis the same way: `redis` by default, the sentinels when
    REDIS_ADDRESSES names them (HA profile), the password apart and required."""
    problems = []
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        env = environment(service)
        if not re.fullmatch(r"\$\{REDIS_ADDRESSES:-redis://redis:6379/\d+\}", env.get("REDIS_URL", "")):
            problems.append(f"{name}: REDIS_URL must be ${{REDIS_ADDRESSES:-redis://redis:6379/N}}")
        if not re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", env.get("REPRISE_REDIS_PASSWORD", "")):
            problems.append(f"{name}: REPRISE_REDIS_PASSWORD must be ${{REDIS_PASSWORD:?...}}")
        if env.get("REPRISE_REDIS_SENTINEL_MASTER") != SENTINEL_MASTER:
            problems.append(f"{name}: REPRISE_REDIS_SENTINEL_MASTER is not {SENTINEL_MASTER!r}")
    return problems


SENTINEL_MASTER = "reprise"
SENTINELS = ("sentinel1", "sentinel2", "sentinel3")


def ha_problems(compose: dict) -> list[str]:
    """The HA profile: a replica of `redis` and three sentinels (quorum 2) watching it under the master name
    Reprise asks for; the addresses in ops/compose.env.example name exactly those sentinels and parse."""
    from scheduler.redis_conn import parse_redis_url

    services, problems = compose["services"], []
    replica = services.get("redis-replica")
    if replica is None:
        return ["no redis-replica service"]
    text = command_text(replica)
    if replica.get("profiles") != ["ha"]:
        problems.append("redis-replica: not in the ha profile only")
    if "--replicaof redis 6379" not in text or "--appendonly yes" not in text:
        problems.append("redis-replica: must be `--replicaof redis 6379` with --appendonly yes")
    for flag in ("--requirepass", "--masterauth"):
        m = re.search(flag + r"\s+(\$\{[^}]*\}|\S+)", text)
        if not m or not REQUIRED_REF.match(m[1]):
            problems.append(f"redis-replica: {flag} must be ${{REDIS_PASSWORD:?...}}")
    m = re.search(r"--masterauth\s+(\$\{[^}]*\}|\S+)", command_text(services["redis"]))
    if not m or not REQUIRED_REF.match(m[1]):
        problems.append("redis: no --masterauth ${REDIS_PASSWORD:?...} (it cannot rejoin as a replica)")
    if "/data" not in named_volume_mounts(replica):
        problems.append("redis-replica: /data is not on a named volume")
    volumes = set()
    for name in SENTINELS:
        sentinel = services.get(name)
        if sentinel is None:
            problems.append(f"no {name} service")
            continue
        text = command_text(sentinel)
        if sentinel.get("profiles") != ["ha"]:
            problems.append(f"{name}: not in the ha profile only")
        m = re.search(r"sentinel monitor (\S+) redis 6379 (\d+)", text)
        if not m or m[1] != SENTINEL_MASTER or int(m[2]) != 2:
            problems.append(f"{name}: must monitor `{SENTINEL_MASTER} redis 6379` with quorum 2")
        if f"sentinel auth-pass {SENTINEL_MASTER} $$REDIS_PASSWORD" not in text or not REQUIRED_REF.match(
            environment(sentinel).get("REDIS_PASSWORD", "")
        ):
            problems.append(f"{name}: no auth-pass from a required REDIS_PASSWORD")
        if "redis-sentinel" not in text:
            problems.append(f"{name}: does not run redis-sentinel")
        mounts = named_volume_mounts(sentinel)
        if "/data" not in mounts:
            problems.append(f"{name}: keeps its rewritten configuration on no named volume")
        volumes.add(mounts.get("/data"))
    if len(volumes) != len(SENTINELS):
        problems.append("sentinels share a volume (each rewrites its own configuration)")
    line = next((x for x in ENV_EXAMPLE.read_text().splitlines() if "REDIS_ADDRESSES=" in x), "")
    try:
        target = parse_redis_url(line.split("=", 1)[1].strip() if line else "", master=SENTINEL_MASTER)
        if sorted(h for h, _ in target.sentinels) != sorted(SENTINELS):
            problems.append(f"ops/compose.env.example: REDIS_ADDRESSES names {target.sentinels}")
    except ValueError as exc:
        problems.append(f"ops/compose.env.example: REDIS_ADDRESSES does not parse: {exc}")
    return problems


def command_problems(compose: dict) -> list[str]:
    """Services built from our image run `reprise <command>`: each command must parse."""
    from ops.cli import build_parser

    problems, env = [], load_env_example()
    parser = build_parser()
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        args = shlex.split(command_text(interpolate(service, env)))
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            problems.append(f"{name}: `reprise {shlex.join(args)}` does not parse")
            continue
        if name.startswith("worker-") and (parsed.command != "worker" or not parsed.model):
            problems.append(f"{name}: not a `reprise worker --model ...`")
        if name == "flower" and (parsed.command != "flower" or parsed.address != "0.0.0.0"):
            problems.append("flower: must be `reprise flower --address 0.0.0.0`")
        if name == "coordinator" and (parsed.command != "coordinator" or parsed.rest[:1] != ["run"]):
            problems.append("coordinator: must be `reprise coordinator run`")
    replicas = compose["services"].get("coordinator", {}).get("deploy", {}).get("replicas", 1)
    if replicas < 2:
        problems.append(f"coordinator: {replicas} replica(s); a standby needs 2")
    return problems


def flower_problems(compose: dict) -> list[str]:
    env = environment(compose["services"]["flower"])
    if not REQUIRED_REF.match(env.get("REPRISE_FLOWER_PASSWORD", "")):
        return ["flower: REPRISE_FLOWER_PASSWORD must be ${VAR:?...} (basic auth)"]
    return []


def api_problems(compose: dict) -> list[str]:
    """`reprise api` listens on every interface of its container, reaches Redis with the password, reads the
    artifacts the workers write, and is published on REPRISE_BIND_ADDRESS only."""
    from ops.cli import build_parser

    service, env = compose["services"]["api"], load_env_example()
    problems = []
    args = build_parser().parse_args(shlex.split(command_text(interpolate(service, env))))
    if args.command != "api" or args.host != "0.0.0.0":
        problems.append("api: must be `reprise api --host 0.0.0.0`")
    port = str(args.port or 8000)
    artifacts = {environment(compose["services"][w]).get("REPRISE_ARTIFACT_URL") for w in worker_names(compose)}
    mounted = named_volume_mounts(service)
    for target in artifacts:
        worker_volume = named_volume_mounts(compose["services"][worker_names(compose)[0]]).get(target)
        if mounted.get(target) != worker_volume:
            problems.append(f"api: does not mount the workers' artifacts volume at {target} (images are read there)")
    published = [p for p in service.get("ports", []) if str(p).endswith(f":{port}")]
    if not published or not all(str(p).startswith("${REPRISE_BIND_ADDRESS:-127.0.0.1}:") for p in published):
        problems.append(f"api: port {port} must be published on ${{REPRISE_BIND_ADDRESS:-127.0.0.1}}")
    test = " ".join((service.get("healthcheck") or {}).get("test") or [])
    if f"127.0.0.1:{port}/healthz" not in test:
        problems.append("api: the healthcheck must ask /healthz")
    return problems


def default_model_problems(compose: dict) -> list[str]:
    """Every process that routes jobs (Flower's HTTP API, workers' redeliveries, the coordinator) sends a request
    that names no model to REPRISE_DEFAULT_MODEL: that must be a model some worker serves."""
    from ops.cli import build_parser

    env, parser = load_env_example(), build_parser()
    served = {
        parser.parse_args(shlex.split(command_text(interpolate(compose["services"][name], env)))).model
        for name in worker_names(compose)
    }
    problems = []
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        default = interpolate(environment(service).get("REPRISE_DEFAULT_MODEL", ""), env)
        if default not in served:
            problems.append(
                f"{name}: REPRISE_DEFAULT_MODEL is {default or 'unset (tiny)'!r}, not a served model {sorted(served)}"
            )
    return problems


def secret_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not REQUIRED_REF.match(value):
                problems.append(f"{name}: {key} holds a literal or optional value, not ${{VAR:?...}}")
    for path, text in walk_strings(compose):
        for m in VARIABLE.finditer(text):
            variable = m["name"] or m["bare"]
            if variable and SECRET_NAME.search(variable) and m["op"] != ":?":
                problems.append(f"{path}: secret {variable} may be empty or defaulted; use ${{{variable}:?...}}")
        for m in re.finditer(REQUIREPASS, text):
            if not REQUIRED_REF.match(m[1]):
                problems.append(f"{path}: --requirepass takes a literal password")
    return problems


def env_example_problems(compose: dict, example: dict[str, str]) -> list[str]:
    required = {m["name"] for _, text in walk_strings(compose) for m in VARIABLE.finditer(text) if m["op"] == ":?"}
    problems = [
        f"{v} is required by docker-compose.yml but not in ops/compose.env.example"
        for v in sorted(required - set(example))
    ]
    problems += [
        f"ops/compose.env.example: {k} has a real-looking value; use a placeholder"
        for k, v in example.items()
        if SECRET_NAME.search(k) and v != "change-me"
    ]
    return problems


def volume_problems(compose: dict) -> list[str]:
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose["services"].items():
        for target, volume in named_volume_mounts(service).items():
            if volume not in declared:
                problems.append(f"{name}: volume {volume} ({target}) is not declared")
    for name in ("redis", "prometheus", "grafana"):
        if not named_volume_mounts(compose["services"][name]):
            problems.append(f"{name}: keeps state but has no named volume")
    return problems


def resilience_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if service.get("restart") not in ("always", "unless-stopped", "on-failure"):
            problems.append(f"{name}: no restart policy")
        test = (service.get("healthcheck") or {}).get("test")
        if not test or (service.get("healthcheck") or {}).get("disable"):
            problems.append(f"{name}: no healthcheck")
    return problems


def prometheus_problems(compose: dict, config: dict) -> list[str]:
    problems = []
    jobs = {job["job_name"]: job for job in config.get("scrape_configs", [])}
    targets = {
        name: {t for sc in job.get("static_configs", []) for t in sc.get("targets", [])} for name, job in jobs.items()
    }
    services = set(compose["services"])
    for name, found in targets.items():
        for target in found:
            host = target.rsplit(":", 1)[0]
            if host not in services | {"localhost"}:
                problems.append(f"job {name}: target {target} is no Compose service")
    worker_targets = {t for ts in targets.values() for t in ts if t.startswith("worker-")}
    expected = {f"{w}:{WORKER_METRICS_PORT}" for w in worker_names(compose)}
    if worker_targets != expected:
        problems.append(f"worker targets {sorted(worker_targets)} != {sorted(expected)}")
    coordinator = [
        sd for job in jobs.values() for sd in job.get("dns_sd_configs", []) if "coordinator" in sd.get("names", [])
    ]
    static_coordinator = {t for ts in targets.values() for t in ts if t.startswith("coordinator:")}
    if (
        not any(sd.get("port") == COORDINATOR_METRICS_PORT for sd in coordinator)
        and f"coordinator:{COORDINATOR_METRICS_PORT}" not in static_coordinator
    ):
        problems.append(f"no job scrapes the coordinator on {COORDINATOR_METRICS_PORT}")
    flower = [job for job in jobs.values() if any(t.startswith("flower:") for t in targets.get(job["job_name"], ()))]
    if not flower or flower[0].get("metrics_path", "/metrics") != "/metrics":
        problems.append("no job scrapes Flower's /metrics")
    prometheus = compose["services"]["prometheus"]
    config_file = next(
        (a.split("=", 1)[1] for a in prometheus.get("command", []) if a.startswith("--config.file=")), None
    )
    if bind_mounts(prometheus).get("ops/prometheus/prometheus.yml", "").split(":")[0] != config_file:
        problems.append("prometheus: ops/prometheus/prometheus.yml is not mounted at --config.file")
    secrets = {f"/run/secrets/{s}" for s in prometheus.get("secrets", [])}
    for path, text in walk_strings(config):
        if path.endswith(("password_file", "credentials_file")) and text not in secrets:
            problems.append(f"prometheus: {text} is not a secret of the prometheus service")
    return problems


def dashboard_metrics(dashboard: dict) -> set[str]:
    return {
        m
        for path, text in walk_strings(dashboard)
        if path.endswith((".expr", ".query", ".definition"))
        for m in re.findall(r"\breprise_[a-z0-9_]+", text)
    }


def dashboard_problems(dashboard: dict, datasource_uid: str) -> list[str]:
    problems = []
    for metric in sorted(dashboard_metrics(dashboard)):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if metric not in COUNTERS_AND_GAUGES | HISTOGRAMS and base not in HISTOGRAMS:
            problems.append(f"dashboard queries unknown metric {metric}")
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        if not exprs or not all(re.search(r"\breprise_", e) for e in exprs):
            problems.append(f"panel {panel.get('title')!r}: every target must query a reprise_ metric")
    text = " ".join(
        " ".join([p.get("title", "")] + [t.get("legendFormat", "") for t in p.get("targets", [])]) for p in panels
    ).lower()
    problems += [f"no panel shows {topic}" for topic in DASHBOARD_TOPICS if topic not in text]
    cells = {}
    for panel in dashboard.get("panels", []):
        g = panel.get("gridPos", {})
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    problems.append(f"panel {panel.get('title')!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = panel.get("title")
            else:
                continue
            break
    uids = {v for path, v in walk_strings(dashboard) if path.endswith(".datasource.uid")}
    if uids != {datasource_uid}:
        problems.append(f"dashboard datasources {sorted(uids)} != provisioned {datasource_uid!r}")
    return problems


def grafana_problems(compose: dict, datasources: dict, provider: dict) -> list[str]:
    problems = []
    mounts = bind_mounts(compose["services"]["grafana"])
    if mounts.get("ops/grafana/provisioning", "").split(":")[0] != "/etc/grafana/provisioning":
        problems.append("grafana: ops/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    paths = {p.get("options", {}).get("path") for p in provider.get("providers", [])}
    if mounts.get("ops/grafana/dashboards") not in paths:
        problems.append(
            f"grafana: dashboards mounted at {mounts.get('ops/grafana/dashboards')}, provider reads {paths}"
        )
    urls = {d.get("url") for d in datasources.get("datasources", []) if d.get("type") == "prometheus"}
    if "http://prometheus:9090" not in urls:
        problems.append(f"grafana: no prometheus datasource at http://prometheus:9090 ({urls})")
    if not REQUIRED_REF.match(environment(compose["services"]["grafana"]).get("GF_SECURITY_ADMIN_PASSWORD", "")):
        problems.append("grafana: GF_SECURITY_ADMIN_PASSWORD must be ${VAR:?...}")
    return problems


def dockerfile_problems(compose: dict, dockerfile: str) -> list[str]:
    problems = []
    lines = [
        line.strip()
        for line in dockerfile.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]
    froms = [arg for op, arg in instructions if op == "FROM"]
    if not froms or not froms[-1].startswith("python:3.11-slim"):
        problems.append(f"image is not based on python:3.11-slim ({froms})")
    entrypoints = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    if not entrypoints or json.loads(entrypoints[-1]) != ["reprise"]:
        problems.append(f'entrypoint is not ["reprise"] ({entrypoints})')
    users = [arg for op, arg in instructions if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image runs as root")
    if not re.search(r"\bHF_HUB_OFFLINE=1\b", " ".join(arg for op, arg in instructions if op == "ENV")):
        problems.append("HF_HUB_OFFLINE=1 is not set")
    if not any(op == "ARG" and arg.startswith("TORCH_VARIANT") for op, arg in instructions):
        problems.append("no TORCH_VARIANT build argument (cuda / cpu)")
    for name, service in compose["services"].items():
        build = service.get("build")
        if build and not (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file():
            problems.append(f"{name}: build.dockerfile does not exist")
    return problems
