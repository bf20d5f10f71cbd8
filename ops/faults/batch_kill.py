"""Row batch_kill: a worker SIGKILLed while a batch of the row's own jobs is in one denoiser call."""

from __future__ import annotations

import signal
import time

from ops.faults.harness import Harness, Row, _artifacts, _wait_all, account


def fault_batch_kill(h: Harness, row: Row) -> None:
    """SIGKILL a worker in the middle of a denoiser call that several requests share: every request of that
    batch comes back (visibility timeout), is computed again on another node and answered once, with one
    image each."""
    from workers.model_loading import save_builtin
    from workers.service import seed_for_job

    since = time.time()
    model = str(save_builtin("tiny", h.workdir / "bmodel", seed=0))  # a queue of its own: only the victim takes it
    folder = str(h.workdir / "qdrant-batch")
    n = 4 if h.quick else 6
    victim = h.start_worker(
        model, REPRISE_CACHE_PATH=folder, REPRISE_FAULT_KILL_AT="denoise", REPRISE_FAULT_KILL_ON="1"
    )
    payloads = [{"prompt": f"a batch killed mid-call {i}", "steps": 24, "model": "bmodel"} for i in range(n)]
    for i, p in enumerate(payloads):
        if i % 2:
            p["seed"] = 1000 + i  # the others rely on the seed the worker derives from the job id
    sent = [h.send(p, model="bmodel") for p in payloads]  # at once: they join the engine together
    deadline = time.monotonic() + 90
    while victim.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    row.check("the worker died by SIGKILL", victim.proc.poll() == -signal.SIGKILL, victim.proc.poll())
    h.cluster.workers.remove(victim)
    killed_at = time.time()
    deaths = [e for e in h.journal() if e["event"] == "killed" and e["t"] >= since and e["pid"] == victim.pid]
    in_call = deaths[0].get("in_call", {}).get("jobs", []) if deaths else []
    ids = [task_id for task_id, _ in sent]
    row.check(
        "the engine had a batch of 2 or more in flight at the kill (its own record of the call)",
        len(in_call) >= 2 and set(in_call) <= set(ids),
        deaths[0] if deaths else "no death journaled",
    )
    rescuer = h.start_worker(model, REPRISE_CACHE_PATH=folder)  # the same cache folder, as a restarted node
    outcomes = _wait_all(h, sent, 120)
    account(row, h, outcomes, since)
    by_id = {o["id"]: o for o in outcomes}
    journal = [e for e in h.journal() if e.get("t", 0) >= since]
    art = _artifacts(h) / "public"
    each = {}
    for job_id in in_call:
        o = by_id[job_id]
        starts = [e for e in journal if e["event"] == "start" and e["job"] == job_id]
        dones = [e for e in journal if e["event"] == "done" and e["job"] == job_id]
        files = sorted(p.name for p in art.glob(f"{job_id}*"))
        payload = payloads[ids.index(job_id)]
        each[job_id] = {
            "state": o["state"],
            "runs started": len(starts),
            "runs done": len(dones),
            "files": files,
            "answered after the kill": bool(dones) and min(e["t"] for e in dones) > killed_at,
            "seed kept": o["state"] == "SUCCESS" and o["result"]["seed"] == payload.get("seed", seed_for_job(job_id)),
        }
    row.check(
        "every request of the killed batch was redelivered and answered once, with one image",
        bool(each)
        and all(
            v["state"] == "SUCCESS"
            and v["runs started"] >= 2
            and v["runs done"] == 1
            and v["answered after the kill"]
            and v["seed kept"]
            and v["files"] == [f"{k}.png"]
            for k, v in each.items()
        ),
        each,
    )
    row.notes.append({"engine at the kill": deaths[0] if deaths else None, "rescuer": rescuer.hostname})
    rescuer.stop()
    h.cluster.workers.remove(rescuer)
