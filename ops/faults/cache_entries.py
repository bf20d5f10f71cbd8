"""Row cache_entries: corrupt, partial and foreign cache entries are never served."""

from __future__ import annotations

import time
from pathlib import Path

from ops.faults.harness import Harness, Row, _artifacts, _qmodel, _run_jobs


def fault_cache_entries(h: Harness, row: Row) -> None:
    """Entries planted in a node's cache folder: corrupt states, another model version, another tenant,
    expired, an old generation; none may be served (a clean planted control entry must be)."""
    import numpy as np
    import redis

    from cache import CacheKey, CacheSettings, LatentCache, state_checksum
    from scheduler.registry import ModelRegistry

    model = _qmodel(h)
    worker = getattr(h, "q_worker", None)
    folder = h.workdir / "qdrant-plant"
    if worker is None or not worker.alive():
        worker = h.start_worker(model, REPRISE_CACHE_PATH=str(folder))
    folder = Path(worker.env["REPRISE_CACHE_PATH"])
    reg = ModelRegistry(redis.Redis.from_url(h.redis.url))
    info = reg.served("qmodel")
    version, generation = info["model_version"], reg.generation("qmodel")
    worker.stop()
    h.cluster.workers.remove(worker)
    steps = 10
    kinds = [
        "control",
        "nan",
        "inf",
        "wrong_shape",
        "wrong_dtype",
        "bad_checksum",
        "other_version",
        "other_tenant",
        "expired",
        "old_generation",
        "exact_other_version",
        "exact_other_tenant",
        "exact_missing_image",
        "exact_expired",
    ]
    planted: dict[str, str] = {}
    rng = np.random.default_rng(0)
    with LatentCache.open(CacheSettings(path=str(folder))) as cache:
        image = next((_artifacts(h)).rglob("*.png"), None)
        for i, kind in enumerate(kinds):
            prompt = f"planted entry {kind} {i}"
            tenant = "eve" if kind.endswith("other_tenant") else "alice"
            key = CacheKey(
                "qmodel",
                "deadbeef" if kind.endswith("other_version") else version,
                generation - 1 if kind == "old_generation" else generation,
                prompt,
                "",
                7,
                steps,
                5.0,
                64,
                64,
                "ddim",
                tenant,
            )
            states = {k: rng.standard_normal((4, 8, 8)).astype(np.float32) for k in cache.state_steps(steps)}
            uri = "file:///nonexistent/image.png" if kind == "exact_missing_image" else f"file://{image}"
            entry_id, vec, rows, payload = cache.build_entry(key, cache.embed(prompt), states, uri, False)
            if kind in ("nan", "inf"):
                bad = np.full((4, 8, 8), np.nan if kind == "nan" else np.inf, np.float16)
                from cache.store import state_to_rows

                for k, slot in payload["state_slots"].items():
                    rows[slot] = state_to_rows(bad)
                    payload["checksums"][k] = state_checksum(bad)  # a valid checksum of a poisoned state
            elif kind == "wrong_shape":
                payload["state_shape"] = [4, 9, 9]
            elif kind == "wrong_dtype":
                payload["state_dtype"] = "float32"
            elif kind == "bad_checksum":
                payload["checksums"] = {k: "0" * 64 for k in payload["checksums"]}
            elif kind in ("expired", "exact_expired"):
                payload["expires_at"] = time.time() - 60
            if kind.startswith("exact_other"):  # planted under the id alice's request looks up, with foreign content
                alice = CacheKey("qmodel", version, generation, prompt, "", 7, steps, 5.0, 64, 64, "ddim", "alice")
                entry_id = alice.exact_id(True)
            cache.store.insert(entry_id, vec, rows, payload)
            planted[kind] = entry_id
    worker = h.start_worker(model, REPRISE_CACHE_PATH=str(folder))
    h.q_worker = worker
    payloads = []
    for i, kind in enumerate(kinds):
        prompt = f"planted entry {kind} {i}"
        seed = 7 if kind.startswith("exact_") else 8  # another seed: only the approximate path can reach it
        payloads.append({"prompt": prompt, "steps": steps, "seed": seed, "model": "qmodel", "tenant": "alice"})
    outcomes = _run_jobs(h, payloads, "qmodel")
    served = {}
    for kind, o in zip(kinds, outcomes):
        served[kind] = (
            (o["result"]["cache"]["hit"], o["result"]["cache"]["source_id"] == planted[kind])
            if o["state"] == "SUCCESS"
            else o["state"]
        )
    # An entry whose image is gone still holds valid states: resuming from them (approximate) is right,
    # serving its image (exact) is not. Every other planted entry must not be used at all.
    wrong = [
        k
        for k, v in served.items()
        if k != "control" and isinstance(v, tuple) and v[1] and (k != "exact_missing_image" or v[0] == "exact")
    ]
    row.sent, row.completed = len(outcomes), sum(o["state"] == "SUCCESS" for o in outcomes)
    row.lost = row.sent - row.completed
    row.duplicated = len(wrong)
    row.max_latency_s = max((o.get("latency_s") or 0) for o in outcomes)
    row.check(
        "the clean planted entry is served (the path is reachable)",
        served["control"] == ("approximate", True),
        served["control"],
    )
    row.check(
        "0 corrupt, foreign-version, foreign-tenant, expired or old-generation entries served",
        not wrong,
        {k: v for k, v in served.items() if k != "control"},
    )
    row.check("every job completed", row.lost == 0)
    log_text = worker.log.read_text(errors="replace")
    row.checks["corrupt entries dropped (log lines)"] = {"ok": True, "detail": log_text.count("is corrupt")}
    row.notes.append("duplicated = planted bad entries served")
