"""Row poison_request: one request whose denoiser call raises inside a batch fails alone, typed; its batch-mates complete once."""

from __future__ import annotations

import time

from ops.faults.harness import Harness, Row, _log_lines, _wait_all, account

POISON_PROMPT = "a poisoned request (fault suite)"


def fault_poison_request(h: Harness, row: Row) -> None:
    """One request whose denoiser call raises (the `sim` device rejects the conditioning of
    REPRISE_SIM_POISON_PROMPT, as a kernel rejecting one request's inputs would) inside a batch: the engine
    runs the batch again in halves, so it alone fails, typed (DenoiserFailed, final: not retried), and its
    batch-mates complete once; on a node of one device and one of two."""
    n = 6 if h.quick else 10
    for devices in ("sim:0", "sim:0,sim:1"):  # one device and two
        since = time.time()
        worker = h.start_worker("sim", devices, REPRISE_SIM_POISON_PROMPT=POISON_PROMPT, REPRISE_CACHE_ENABLED="false")
        payloads = [{"prompt": f"a batch-mate of the poison {devices} {i}", "steps": 20, "seed": i} for i in range(n)]
        payloads.insert(n // 2, {"prompt": POISON_PROMPT, "steps": 20, "seed": 7})
        sent = [h.send(p, model="sim") for p in payloads]  # at once: they share calls
        outcomes = _wait_all(h, sent, 120)
        retried_before = row.retried
        account(row, h, outcomes, since, expect_failure=True)
        poison_id = sent[n // 2][0]
        poison = outcomes[n // 2]
        others = [o for o in outcomes if o["id"] != poison_id]
        row.check(
            f"{devices}: the poison request alone failed, typed (DenoiserFailed)",
            poison["state"] == "FAILURE" and poison.get("error") == "DenoiserFailed",
            {k: poison.get(k) for k in ("state", "error", "message")},
        )
        done = sum(o["state"] == "SUCCESS" for o in others)
        row.check(f"{devices}: every other request completed", done == len(others), f"{done}/{len(others)}")
        row.check(
            f"{devices}: nothing ran twice (the poison's failure is final, not retried)",
            row.retried == retried_before,
            row.retried,
        )
        split = [line for line in _log_lines(worker, r"running its \d+ requests again in halves") if poison_id in line]
        row.check(f"{devices}: the poison failed inside a batch first (the engine's log)", bool(split), len(split))
        row.notes.append({devices: split[0][-200:] if split else None})
        worker.stop()
        h.cluster.workers.remove(worker)
