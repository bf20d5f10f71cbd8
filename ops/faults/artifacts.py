"""Row artifacts: a full artifact disk."""

from __future__ import annotations

import re
import time

from ops.faults.harness import Harness, Row, _qmodel, _run_jobs, account


def fault_artifacts(h: Harness, row: Row) -> None:
    """Artifact store full (ENOSPC) or impossible (a path under a regular file): typed ArtifactWriteError, never done."""
    since = time.time()
    model = _qmodel(h)
    flag = h.workdir / "artifacts-full.flag"
    # A node whose artifact root lies under a regular file (also what a read-only mount answers: an OSError).
    blocker = h.workdir / "not-a-directory"
    blocker.write_text("a file, not a directory")
    steady = getattr(h, "q_worker", None)
    if steady is None or not steady.alive():  # every hooked node of this model fills its disk while the flag exists
        steady = h.q_worker = h.start_worker(model, wait=False, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-q"))
    bad = h.start_worker(
        model, REPRISE_ARTIFACT_URL=str(blocker / "artifacts"), REPRISE_CACHE_PATH=str(h.workdir / "qdrant-art")
    )
    h.cluster.wait_worker_ready(steady, 180)
    flag.write_text("full")
    outcomes = _run_jobs(
        h, [{"prompt": f"unwritable {i}", "steps": 4, "seed": i, "model": "qmodel"} for i in range(4)], "qmodel"
    )
    bad.stop()
    h.cluster.workers.remove(bad)
    full = _run_jobs(
        h, [{"prompt": f"disk full {i}", "steps": 4, "seed": i, "model": "qmodel"} for i in range(2)], "qmodel"
    )
    flag.unlink()
    after = _run_jobs(h, [{"prompt": "disk has room again", "steps": 4, "seed": 1, "model": "qmodel"}], "qmodel")
    account(row, h, outcomes + full, since, expect_failure=True)
    errors = {o.get("error") for o in outcomes + full}
    row.check("every job failed with ArtifactWriteError", errors == {"ArtifactWriteError"}, sorted(map(str, errors)))
    from scheduler.app import get_app

    states = {get_app().AsyncResult(o["id"]).state for o in outcomes + full}
    row.check("none reported as done", states == {"FAILURE"}, sorted(states))
    row.check("the node serves again once the disk has room", after[0]["state"] == "SUCCESS", after[0]["state"])
    causes = sorted(
        {m.group(0) for o in outcomes + full for m in [re.search(r"\[Errno \d+\] [^:']+", o.get("message", ""))] if m}
    )
    row.notes.append(f"causes seen: {causes}")
