"""Row redis_failover: a real master, replica and three sentinels; the master SIGKILLed mid-stream and the
replica promoted; every accepted job answered once, tokens and generations never go backwards."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ops.faults.harness import Harness, Row, _wait_all, account


def sentinel_command(conf: str) -> list[str]:
    """Debian's `redis-sentinel CONF` (package redis-sentinel; .ci/run installs it), else `redis-server CONF
    --sentinel`: the same binary in sentinel mode (what Debian's package links to), which reads its config
    file only as its first argument (`redis-server --sentinel CONF` is refused as a config line)."""
    found = shutil.which("redis-sentinel")
    if found:
        return [found, conf]
    server = shutil.which("redis-server")
    if server:
        return [server, conf, "--sentinel"]
    raise RuntimeError("neither redis-sentinel nor redis-server is installed (apt-get install redis-sentinel)")


@dataclass
class SentinelSet:
    """A real Redis HA set on spare ports: a master and a replica (append-only, a password), three
    sentinels (quorum 2) that promote the replica within about two seconds of the master's death."""

    directory: str
    master_name: str = "reprise-faults"
    password: str = field(default_factory=lambda: "faults-" + secrets.token_hex(8))
    ports: list = field(default_factory=list)
    sentinel_ports: list = field(default_factory=list)
    servers: dict = field(default_factory=dict)
    sentinels: list = field(default_factory=list)

    @property
    def url(self) -> str:
        first, *rest = self.sentinel_ports
        return ";".join(
            [f"sentinel://:{self.password}@127.0.0.1:{first}/0"] + [f"sentinel://127.0.0.1:{p}" for p in rest]
        )

    def env(self) -> dict:
        return {"REDIS_URL": self.url, "REPRISE_REDIS_URL": self.url, "REPRISE_REDIS_SENTINEL_MASTER": self.master_name}

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        from ops.localcluster import _wait, redis_reachable

        folder = Path(self.directory) / f"redis-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--requirepass", self.password]
        cmd += ["--masterauth", self.password, "--repl-ping-replica-period", "1", "--repl-diskless-sync-delay", "0"]
        if replica_of:
            cmd += ["--replicaof", "127.0.0.1", str(replica_of)]
        log = open(folder / "redis.log", "ab")
        self.servers[port] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _wait(lambda: redis_reachable(self.server_url(port), 0.2), 20, f"redis-server on port {port}")

    def server_url(self, port: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{port}/0"

    def start(self) -> "SentinelSet":
        import redis

        from ops.localcluster import _wait, free_port

        self.ports = [free_port(), free_port()]
        self.start_server(self.ports[0])
        self.start_server(self.ports[1], replica_of=self.ports[0])
        for i in range(3):
            port = free_port()
            folder = Path(self.directory) / f"sentinel-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # sentinels rewrite their own file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.ports[0]} 2\n"
                f"sentinel auth-pass {self.master_name} {self.password}\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            log = open(folder / "sentinel.log", "ab")
            self.sentinels.append(subprocess.Popen(sentinel_command(str(conf)), stdout=log, stderr=subprocess.STDOUT))
            self.sentinel_ports.append(port)

        def ready() -> bool:  # every sentinel knows the master, the replica and the two other sentinels
            try:
                for port in self.sentinel_ports:
                    s = redis.Redis(port=port, socket_timeout=0.5)
                    m = s.sentinel_master(self.master_name)
                    if int(m["num-slaves"]) < 1 or int(m["num-other-sentinels"]) < 2:
                        return False
                return True
            except (redis.RedisError, OSError):
                return False

        _wait(ready, 60, "three sentinels watching the master and its replica")
        return self

    def master_port(self) -> int | None:
        """The master as a majority of the sentinels name it."""
        import redis

        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                addr = redis.Redis(port=port, socket_timeout=0.5).sentinel_get_master_addr_by_name(self.master_name)
                if addr:
                    votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
            except (redis.RedisError, OSError):
                pass
        best = max(votes.items(), key=lambda kv: kv[1], default=(None, 0))
        return best[0] if best[1] >= 2 else None

    def wait_replica_synced(self, port: int, timeout: float) -> float | None:
        """When the server on ``port`` is a replica whose link to its master is up (time.time()), or None."""
        import redis

        deadline = time.monotonic() + timeout
        r = redis.Redis.from_url(self.server_url(port), socket_timeout=1)
        while time.monotonic() < deadline:
            try:
                info = r.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return time.time()
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        return None

    def open_gap(self, master: int, seconds: float) -> dict:
        """Cut the replicas' links to ``master`` for ``seconds`` (they cannot reconnect); returns the replication
        offsets then: bytes written on the master that its replicas do not have."""
        import redis

        m = redis.Redis.from_url(self.server_url(master), socket_timeout=1)
        # A new password keeps the replica from reconnecting (its AUTH fails); clients already connected
        # (workers, producers, the sentinels) keep writing to the master.
        m.config_set("requirepass", "gap-" + secrets.token_hex(8))
        m.execute_command("CLIENT", "KILL", "TYPE", "replica")
        time.sleep(seconds)
        master_offset = int(m.info("replication")["master_repl_offset"])
        replica_offsets = {}
        for port in self.servers:
            if port != master:
                try:
                    info = redis.Redis.from_url(self.server_url(port), socket_timeout=1).info("replication")
                    replica_offsets[port] = int(info.get("slave_repl_offset", info.get("master_repl_offset", 0)))
                except (redis.RedisError, OSError):
                    pass
        behind = {p: master_offset - o for p, o in replica_offsets.items()}
        return {"master_offset": master_offset, "bytes_the_replica_lacks": behind}

    def kill(self, port: int) -> None:
        proc = self.servers[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.servers.values()]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _switch_redis(h: Harness, env: dict) -> dict:
    """Point this process (a producer) and every process the harness starts from now on at ``env``'s Redis;
    returns what to hand back to restore the previous one."""
    from scheduler import app as app_mod
    from scheduler.settings import get_settings

    saved = {
        "os": {k: os.environ.get(k) for k in env},
        "h": {k: h.env.get(k) for k in env},
        "c": {k: h.cluster.env.get(k) for k in env},
    }
    for target, values in ((os.environ, env), (h.env, env), (h.cluster.env, env)):
        for k, v in values.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    get_settings.cache_clear()
    app_mod._default = None  # the next get_app() reads the new settings
    app_mod._ledger_clients.clear()
    return saved


def _restore_redis(h: Harness, saved: dict) -> None:
    from scheduler import app as app_mod
    from scheduler.settings import get_settings

    for target, key in ((os.environ, "os"), (h.env, "h"), (h.cluster.env, "c")):
        for k, v in saved[key].items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    get_settings.cache_clear()
    app_mod._default = None
    app_mod._ledger_clients.clear()


def fault_redis_failover(h: Harness, row: Row) -> None:
    """Redis Sentinel: a master, a replica, three sentinels; the master SIGKILLed under load; the sentinels
    promote the replica. Workers, a coordinator and Flower run through sentinel:// addresses all along."""
    import requests

    from scheduler.coordinator import status
    from scheduler.redis_conn import redis_client
    from scheduler.registry import ModelRegistry
    from scheduler.settings import get_settings

    since = time.time()
    ha = SentinelSet(str(h.workdir / "ha")).start()
    saved = _switch_redis(h, ha.env())
    started: list = []
    coord = None
    try:
        devices = ["cpu"] if h.quick else ["cpu", "cpu,cpu"]  # a node of one device and a node of two
        started = [
            h.start_worker("tiny", devices=d, wait=False, REPRISE_CACHE_PATH=str(h.workdir / f"qdrant-ha{i}"))
            for i, d in enumerate(devices)
        ]
        for w in started:
            h.cluster.wait_worker_ready(w, 180)
        pids = sorted(w.pid for w in started)
        coord = h.start_coordinator("ha")
        flower_auth = ("reprise", "faults-flower-" + secrets.token_hex(6))
        h.cluster.start_flower(password=flower_auth[1], timeout=90)
        prefix = get_settings().queue_prefix
        reg = ModelRegistry(redis_client(socket_timeout=2, socket_connect_timeout=2), prefix)
        gen_before = reg.bump("tiny", "redis_failover: before the failover")
        deadline = time.monotonic() + 40
        while not status()["leader"]:
            assert time.monotonic() < deadline, "no coordinator took the lease"
            time.sleep(0.2)
        token_before = status()["token"]

        samples: list[tuple[float, int, int]] = []  # (t, fencing token, generation) as the current master says
        stop_sampling = threading.Event()

        def sample() -> None:
            r = redis_client(socket_timeout=1, socket_connect_timeout=1)  # follows the new master
            while not stop_sampling.wait(0.2):
                try:
                    samples.append(
                        (time.time(), int(r.get(f"{prefix}:coordinator:token") or 0), int(reg.generation("tiny")))
                    )
                except Exception:
                    pass  # no master right now

        sent: list[tuple[str, float]] = []
        refused: dict[str, int] = {}
        refused_ids: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                try:
                    sent.append(h.send({"prompt": f"redis failover prompt {i}", "steps": 6, "seed": i}))
                except Exception as exc:  # not accepted: the caller saw an error and knows to resend
                    refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
                    m = re.search(r"job ([0-9a-f-]{36}) not accepted", str(exc))
                    if m:
                        refused_ids.append(m.group(1))
                i += 1
                time.sleep(0.15)

        # Beside Reprise's producer, a plain Celery client (no Reprise code: no ledger, no WAIT), as any other
        # service would send: what it gets back is reported, not checked (its sends are only as durable as
        # Redis' asynchronous replication).
        from celery import Celery

        plain = Celery("plain", broker=ha.url, backend=ha.url)
        options = {"master_name": ha.master_name}
        plain.conf.update(broker_transport_options=options, result_backend_transport_options=options)
        plain_sent: list[str] = []
        plain_refused = [0]

        def plain_load() -> None:
            i = 0
            while not stop.is_set():
                try:
                    payload = {"prompt": f"plain celery prompt {i}", "steps": 6, "seed": i}
                    plain_sent.append(plain.send_task("reprise.generate", kwargs=payload, queue="reprise.tiny").id)
                except Exception:
                    plain_refused[0] += 1
                i += 1
                time.sleep(0.3)

        threads = [
            threading.Thread(target=load, daemon=True),
            threading.Thread(target=sample, daemon=True),
            threading.Thread(target=plain_load, daemon=True),
        ]
        for t in threads:
            t.start()
        time.sleep(5)
        old = ha.master_port()
        # Open an asynchronous-replication gap first: the master drops its replica's link and keeps taking
        # writes (workers popping, storing results, acknowledging) for 0.3 s, then dies. What it took meanwhile
        # never reaches the replica that the sentinels promote.
        gap = ha.open_gap(old, 0.3)
        ha.kill(old)
        killed_at = time.time()
        row.check(
            "the promoted replica lacked writes the master had taken (a real asynchronous-replication gap)",
            any(v > 0 for v in gap["bytes_the_replica_lacks"].values()),
            gap,
        )
        promoted_at, new = None, None
        while time.time() - killed_at < 60:
            new = ha.master_port()
            if new is not None and new != old:
                promoted_at = time.time()
                break
            time.sleep(0.1)
        row.check(
            "the sentinels promoted the replica",
            promoted_at is not None,
            {"old_master": old, "new_master": new, "seconds": round((promoted_at or time.time()) - killed_at, 2)},
        )
        time.sleep(1)
        # The old host comes back as a replica of the new master (as its restarted service would, with the
        # sentinels' rewritten view); until a replica confirms writes again, sends are refused (min replicas 1).
        ha.start_server(old, replica_of=new)
        healed_at = ha.wait_replica_synced(old, 60)
        row.check("the old master rejoined as a replica", healed_at is not None)
        time.sleep(8)
        stop.set()
        threads[0].join()
        threads[2].join()
        outcomes = _wait_all(h, sent, 180)
        plain_states: dict[str, int] = {}
        deadline = time.monotonic() + 60
        for task_id in plain_sent:
            state = "PENDING"
            while time.monotonic() < deadline:
                try:
                    state = plain.AsyncResult(task_id).state
                except Exception:
                    state = "PENDING"
                if state in ("SUCCESS", "FAILURE"):
                    break
                time.sleep(0.2)
            plain_states[state] = plain_states.get(state, 0) + 1
        account(row, h, outcomes, since)
        late = {task_id for task_id, at in sent if healed_at and at > healed_at}
        done_late = sum(1 for o in outcomes if o["id"] in late and o["state"] == "SUCCESS")
        row.check(
            "jobs sent once the old master had rejoined completed (producer and workers follow the new master)",
            bool(late) and done_late == len(late),
            f"{done_late}/{len(late)}",
        )
        alive = sorted(w.pid for w in started if w.alive())
        row.check("workers survived (same processes)", alive == pids, {"before": pids, "after": alive})
        served_late = {e["pid"] for e in h.journal() if e["event"] == "done" and promoted_at and e["t"] > promoted_at}
        row.check(
            "every worker served jobs from the new master", set(pids) <= served_late, sorted(served_late & set(pids))
        )
        # Counters: never backwards across the failover, and a new bump lands above every value seen before.
        gen_after, deadline = None, time.monotonic() + 30
        while gen_after is None:
            try:
                gen_after = reg.bump("tiny", "redis_failover: after the failover")
            except Exception:  # the old master still syncing as a replica: no confirmation yet
                assert time.monotonic() < deadline, "no generation bump was confirmed after the failover"
                time.sleep(0.5)
        time.sleep(1)
        stop_sampling.set()
        threads[1].join()
        tokens = [t for _, t, _ in samples]
        gens = [g for _, _, g in samples]
        row.check(
            "fencing tokens and cache generations never went backwards (sampled every 0.2 s through the failover)",
            len(samples) > 20
            and all(a <= b for a, b in zip(tokens, tokens[1:]))
            and all(a <= b for a, b in zip(gens, gens[1:]))
            and min(tokens) >= token_before
            and min(gens) >= gen_before,
            {
                "samples": len(samples),
                "token_before": token_before,
                "tokens": sorted(set(tokens)),
                "generation_before": gen_before,
                "generations": sorted(set(gens)),
                "bump_after": gen_after,
            },
        )
        row.check("a bump after the failover lands above every generation before it", gen_after > gen_before)
        deadline = time.monotonic() + 30
        while True:
            st = status()
            if st["leader"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        row.check(
            "the coordinator survived and leads again, with a token not below the one before",
            coord.poll() is None and bool(st["leader"]) and st["token"] >= token_before,
            {"alive": coord.poll() is None, "leader": st["leader"], "token": st["token"], "before": token_before},
        )
        flower_ok, seen = False, 0
        deadline = time.monotonic() + 30
        while not flower_ok and time.monotonic() < deadline:
            try:
                tasks = requests.get(
                    h.cluster.flower_url + "/api/tasks", auth=flower_auth, params={"limit": 5000}, timeout=5
                ).json()
                seen = sum(1 for i in late if tasks.get(i, {}).get("state") == "SUCCESS")
                flower_ok = bool(late) and seen == len(late)
            except (requests.RequestException, ValueError):
                pass
            if not flower_ok:
                time.sleep(1)
        row.check(
            "Flower survived and saw every job sent after the rejoin succeed (its events follow the new master)",
            h.cluster.flower.poll() is None and flower_ok,
            f"{seen}/{len(late)}",
        )
        leaks = {p.name: n for p in h.workdir.glob("*.log") if (n := p.read_text(errors="replace").count(ha.password))}
        row.check("no process log holds the Redis password (sentinel:// URLs are masked too)", not leaks, leaks or None)
        from scheduler.app import get_app

        ran_anyway = sum(1 for i in refused_ids if get_app().AsyncResult(i).state == "SUCCESS")
        resent = int(redis_client().hget(f"{prefix}:ledger:resent", "jobs") or 0)
        row.notes.append(
            f"master 127.0.0.1:{old} SIGKILLed, replica 127.0.0.1:{new} promoted in "
            f"{round((promoted_at or killed_at) - killed_at, 2)} s; bytes the promoted replica lacked: "
            f"{sum(gap['bytes_the_replica_lacks'].values())}; "
            f"old master synced as its replica "
            f"{round((healed_at or killed_at) - killed_at, 2)} s after the kill; sends refused meanwhile (the caller "
            f"was told; not accepted): {refused or 0}, of which {ran_anyway} ran all the same; jobs the ledger sent "
            f"again (no queue, worker or result held them on the new master): {resent}; jobs that ran more than "
            f"once (their pop, result or acknowledgement lost in the gap): {row.retried}"
        )
        row.notes.append(
            f"plain Celery client (no Reprise code) through the same sentinels: accepted {len(plain_sent)}, "
            f"refused {plain_refused[0]}, outcomes {plain_states} (PENDING = accepted and never answered)"
        )
    finally:
        stop_flags = [v for k, v in locals().items() if k in ("stop", "stop_sampling")]
        for flag in stop_flags:
            flag.set()
        for w in started:
            if w.alive():
                w.stop()
            if w in h.cluster.workers:
                h.cluster.workers.remove(w)
        if coord is not None and coord.poll() is None:
            coord.terminate()
            coord.wait(10)
        if coord in h.coordinators:
            h.coordinators.remove(coord)
        if h.cluster.flower is not None and h.cluster.flower.poll() is None:
            h.cluster.flower.terminate()
            h.cluster.flower.wait(10)
        h.cluster.flower = None
        _restore_redis(h, saved)
        ha.stop()
