"""Row worker_kill: a worker SIGKILLed at each phase of a job; every accepted job is answered once."""

from __future__ import annotations

import glob
import random
import threading
import time

from ops.faults.harness import Harness, Row, _artifacts, _wait_all, account
from ops.faults.hooks import PHASES


def fault_worker_kill(h: Harness, row: Row) -> None:
    """SIGKILL workers at each named point of a job (and at random moments), repeatedly, under load."""
    since = time.time()
    base = h.start_worker("tiny", REPRISE_CACHE_PATH=str(h.workdir / "qdrant-kill-a"))
    plan = list(PHASES) if not h.quick else ["denoise", "artifact"]
    rng = random.Random(8)
    folders = [str(h.workdir / "qdrant-kill-b")]
    victim = h.start_worker(
        "tiny", REPRISE_CACHE_PATH=folders[0], REPRISE_FAULT_KILL_AT=plan[0], REPRISE_FAULT_KILL_ON="2"
    )
    sent: list[tuple[str, float]] = []
    stop = threading.Event()
    kills: list[str] = []

    def load() -> None:
        i = 0
        while not stop.is_set():
            prompt = f"kill test prompt {i % 7}"  # repeats: exact and approximate hits and write-backs happen
            payload = {"prompt": prompt, "steps": 8}
            if i % 2:
                payload["seed"] = i  # the other half rely on the seed the worker derives from the job id
            try:
                sent.append(h.send(payload))
            except Exception as exc:
                row.notes.append(f"send refused: {exc}")
            i += 1
            time.sleep(0.25)

    producer = threading.Thread(target=load, daemon=True)
    producer.start()
    for phase in plan:
        # wait for the planned death, then restart the node on the same cache folder with the next point
        deadline = time.monotonic() + 60
        while victim.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if victim.alive():
            victim.kill()
            kills.append(f"{phase}:timer")
        else:
            kills.append(phase)
        h.cluster.workers.remove(victim)
        nxt = plan[plan.index(phase) + 1] if plan.index(phase) + 1 < len(plan) else None
        env = {"REPRISE_CACHE_PATH": folders[0]}
        if nxt:
            env.update(REPRISE_FAULT_KILL_AT=nxt, REPRISE_FAULT_KILL_ON=str(rng.randint(1, 3)))
        victim = h.start_worker("tiny", wait=False, **env)
        if not nxt:
            break
    # and one kill at a random moment of the steady worker, restarted at once
    time.sleep(rng.uniform(0.5, 2.0))
    base.kill()
    kills.append("random-moment")
    h.cluster.workers.remove(base)
    base = h.start_worker("tiny", wait=False, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-kill-a"))
    time.sleep(3)
    stop.set()
    producer.join()
    h.cluster.wait_worker_ready(victim, 180)
    h.cluster.wait_worker_ready(base, 180)
    outcomes = _wait_all(h, sent, 150)
    account(row, h, outcomes, since)
    import redis

    from scheduler.app import ledger_key
    from scheduler.settings import get_settings

    resent_key = ledger_key(get_settings().queue_prefix) + ":resent"
    resent = int(redis.Redis.from_url(h.redis.url).hget(resent_key, "jobs") or 0)
    row.notes.append(
        f"jobs lost by the broker transport (popped by a worker killed before it recorded them) and "
        f"sent again from the ledger: {resent}"
    )
    deaths = [e["phase"] for e in h.journal() if e["event"] == "killed" and e["t"] >= since]
    row.check("each planned point killed a worker", set(plan) <= set(deaths), {"kills": kills, "deaths": deaths})
    parts = glob.glob(str(_artifacts(h) / "**" / "*.part"), recursive=True)
    row.notes.append(
        f"kills: {kills}; temporary .part files left by a death mid-write and not yet cleaned: {len(parts)} (never served)"
    )
    h.kill_workers = [base, victim]
