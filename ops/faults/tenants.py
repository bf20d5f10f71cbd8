"""Row tenants: one tenant's images and states are never served to another."""

from __future__ import annotations

import statistics
import time

from ops.faults.harness import Harness, Row, _qmodel, _run_jobs, _service_s, _sha, account


def fault_tenants(h: Harness, row: Row) -> None:
    """Private entries never hit across tenants; share only when granted; timing padding measured."""
    model = _qmodel(h)
    worker = getattr(h, "q_worker", None)
    if worker is None or not worker.alive():
        worker = h.q_worker = h.start_worker(model, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-tenants"))
    q = "qmodel"

    def one(prompt, tenant, seed=3, **cache):
        return _run_jobs(
            h,
            [
                {
                    "prompt": prompt,
                    "steps": 10,
                    "seed": seed,
                    "model": q,
                    "tenant": tenant,
                    **({"cache": cache} if cache else {}),
                }
            ],
            q,
        )[0]

    outcomes = []
    outcomes.append(one("a private dragon", "alice"))
    time.sleep(0.5)
    bob_exact = one("a private dragon", "bob")
    carol_approx = one("a private dragon", "carol", seed=4)  # another seed: only the approximate path could reach it
    outcomes += [bob_exact, carol_approx]
    row.check(
        "private entries are never hits for another tenant (exact, approximate)",
        bob_exact["result"]["cache"]["hit"] == "miss" and carol_approx["result"]["cache"]["hit"] == "miss",
        [bob_exact["result"]["cache"]["hit"], carol_approx["result"]["cache"]["hit"]],
    )
    poison = one("a poisoned lighthouse", "mallory", share=True)
    time.sleep(0.5)
    victim = one("a poisoned lighthouse", "alice")
    outcomes += [poison, victim]
    row.check(
        "an ungranted share is ignored, with a note",
        "not granted" in (poison["result"]["cache"]["note"] or ""),
        poison["result"]["cache"]["note"],
    )
    row.check(
        "so it cannot reach another tenant",
        victim["result"]["cache"]["hit"] == "miss",
        victim["result"]["cache"]["hit"],
    )
    shared = one("a studio shared castle", "studio", share=True)
    time.sleep(0.5)
    reuse = one("a studio shared castle", "bob")
    outcomes += [shared, reuse]
    a, b = shared["result"]["image_uri"], reuse["result"]["image_uri"]
    row.check(
        "a granted tenant's shared entry serves others",
        reuse["result"]["cache"]["hit"] == "exact",
        reuse["result"]["cache"]["hit"],
    )
    row.check(
        "...from the other tenant's own copy, never the sharer's path",
        a != b and "/bob/" in b and _sha(a.removeprefix("file://")) == _sha(b.removeprefix("file://")),
        [a, b],
    )
    # timing: misses vs exact hits of the same size, with and without isolate_timing
    n = 4 if h.quick else 8
    timing = {}
    for isolate in (False, True):
        prompts = [f"timing probe {isolate} {i}" for i in range(n)]
        for p in prompts[:2]:  # warm the node's step timer on this size
            one(p + " warm", "timer", isolate_timing=isolate)
        miss = [one(p, "timer", isolate_timing=isolate) for p in prompts]
        time.sleep(0.5)
        hit = [one(p, "timer", isolate_timing=isolate) for p in prompts]
        outcomes += miss + hit
        tm = [_service_s(o) for o in miss]
        th = [_service_s(o) for o in hit]
        em = [o["latency_s"] for o in miss if o.get("latency_s")]
        eh = [o["latency_s"] for o in hit if o.get("latency_s")]
        timing["isolated" if isolate else "plain"] = {
            "hits": sum(o["result"]["cache"]["hit"] == "exact" for o in hit),
            "miss_median_ms": round(statistics.median(tm) * 1000, 1),
            "hit_median_ms": round(statistics.median(th) * 1000, 1),
            "residual_median_ms": round((statistics.median(tm) - statistics.median(th)) * 1000, 1),
            "end_to_end_miss_median_ms": round(statistics.median(em) * 1000, 1) if em else None,
            "end_to_end_hit_median_ms": round(statistics.median(eh) * 1000, 1) if eh else None,
            "miss_spread_ms": round((max(tm) - min(tm)) * 1000, 1),
        }
    iso = timing["isolated"]
    row.checks["timing (worker-side, queue wait excluded)"] = {"ok": True, "detail": timing}
    row.check(
        "isolate_timing: hit-vs-miss median within the misses' own spread",
        abs(iso["residual_median_ms"]) <= max(iso["miss_spread_ms"], 25),
        iso,
    )
    account(row, h, outcomes, 0)
