"""Bad and hostile input: a hypothesis fuzzer over requests and raw task messages (issue 8).

`make test` runs a few hundred cases; `make faults` runs 10,000 (ops/faults/fuzz.py, row "fuzz")."""

from __future__ import annotations

import pytest

from ops.faults.fuzz import fuzz_in_process


def test_worker_validation_answers_every_fuzz_case_with_a_result_or_a_typed_error():
    counts = fuzz_in_process(400, keep=0, seed=1)
    assert counts["cases"] >= 300
    assert counts["crashes"] == 0, counts["crash_examples"]
    assert counts["typed_errors"] > 0 and counts["accepted"] > 0  # the strategy reaches both sides


@pytest.mark.integration
def test_raw_fuzz_messages_through_the_broker_never_crash_a_worker(cluster):
    from ops.faults.fuzz import _push_garbage
    from scheduler.app import GENERATE_TASK, get_app
    from scheduler.client import submit
    from scheduler.errors import InvalidRequest

    kept = fuzz_in_process(150, keep=40, seed=2)["kept"]
    app = get_app()
    pids = sorted(w.pid for w in cluster.workers if w.alive())
    sent = []
    for i, payload in enumerate(kept):
        if (
            isinstance(payload, dict)
            and isinstance(payload.get("steps"), int)
            and not isinstance(payload.get("steps"), bool)
        ):
            payload = {**payload, "steps": min(payload["steps"], 3)}
        if isinstance(payload, dict) and i % 2:
            sent.append(app.send_task(GENERATE_TASK, kwargs=payload, queue="reprise.tiny"))
        else:
            sent.append(app.send_task(GENERATE_TASK, args=[payload], queue="reprise.tiny"))

    class _Garbage:  # _push_garbage needs only the Redis URL
        class redis:
            url = cluster.redis_url

    _push_garbage(_Garbage)
    untyped = []
    for ar in sent:
        try:
            ar.get(timeout=60)
        except InvalidRequest:
            pass
        except Exception as exc:  # anything else is a bug: a crash, or an untyped answer
            untyped.append(f"{type(exc).__name__}: {exc}")
    assert not untyped, untyped[:5]
    assert sorted(w.pid for w in cluster.workers if w.alive()) == pids
    assert submit(prompt="alive after the fuzz", steps=2).wait(60).steps == 2
