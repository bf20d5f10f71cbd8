"""Row fuzz: random and malformed requests, in process and through the broker."""

from __future__ import annotations

import json
import random
import time
import uuid

from ops.faults.harness import Harness, Row, _wait_all


def fuzz_strategies():
    from hypothesis import strategies as st

    weird_text = st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            [
                "",
                " ",
                "\x00",
                "a\x00b",
                "\u202e\u202dRTL",
                "\ud800",
                "\udfff",
                "e\u0301" * 50,
                "🧨" * 600,
                "\uffff",
                "\n\t\r",
                "x" * 2001,
                "x" * 100_000,
                "NaN",
                "null",
                "{}",
                "DROP TABLE",
            ]
        ),
    )
    numbers = st.one_of(
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -1, 1, 7, 8, 63, 64, 2**32, 2**31 - 1, 2**64, -(2**63)]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([float("nan"), float("inf"), -0.0, 1e308]),
    )
    scalars = st.one_of(st.none(), st.booleans(), numbers, weird_text)
    junk = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=4,
    )
    field_values = {
        "prompt": st.one_of(weird_text, junk),
        "negative_prompt": st.one_of(weird_text, junk),
        "seed": st.one_of(numbers, junk),
        "steps": st.one_of(numbers, junk),
        "guidance_scale": st.one_of(numbers, junk),
        "width": st.one_of(numbers, junk),
        "height": st.one_of(numbers, junk),
        "scheduler": st.one_of(st.sampled_from(["ddim", "euler", "dpmpp_2m", "DDIM", "lms", ""]), junk),
        "model": st.one_of(
            st.sampled_from(["tiny", "sd15", "../etc/passwd", "tiny\x00", "t" * 65, "", "qmodel"]), junk
        ),
        "priority": st.one_of(numbers, junk),
        "tenant": st.one_of(st.sampled_from(["public", "../root", "a b", "studio", "*"]), junk),
        "schema_version": st.one_of(st.sampled_from(["1.0", "2.0", ""]), junk),
        "cache": st.one_of(
            junk,
            st.fixed_dictionaries(
                {},
                optional={
                    "exact": junk,
                    "approximate": st.booleans(),
                    "share": st.one_of(st.booleans(), junk),
                    "isolate_timing": junk,
                    "feature": st.one_of(
                        junk,
                        st.fixed_dictionaries(
                            {}, optional={"method": junk, "deepcache_interval": numbers, "block_delta": numbers}
                        ),
                    ),
                },
            ),
        ),
    }
    valid_prompt = st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=60
    ).filter(str.strip)
    optional = {k: v for k, v in field_values.items() if k != "prompt"}
    near_valid = st.fixed_dictionaries(
        {"prompt": st.one_of(valid_prompt, valid_prompt, field_values["prompt"])},
        optional={**optional, "junk_field": junk},
    )
    return st.one_of(
        near_valid, st.dictionaries(st.sampled_from(sorted(field_values) + ["junk"]), junk, max_size=6), junk
    )


def fuzz_in_process(n: int, keep: int = 0, seed: int = 0) -> dict:
    """n hypothesis cases through the worker's own validation: each is accepted or an InvalidRequest; nothing else."""
    from types import SimpleNamespace

    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from scheduler.errors import InvalidRequest
    from workers.families import SD15
    from workers.model_loading import ModelSpec
    from workers.service import Device, DevicePool, GenerationService

    # validation needs only the served name, the size limits and defaults, and the family: the tiny model's
    spec = ModelSpec(
        "tiny", default_size=64, max_size=512, default_steps=25, default_guidance=5.0, default_scheduler="ddim"
    )
    components = SimpleNamespace(spec=spec, vae_scale_factor=8, size_multiple=8, family=SD15)
    service = GenerationService("tiny", DevicePool([Device("cpu", SimpleNamespace(c=components))]), artifacts=None)
    counts = {"cases": 0, "accepted": 0, "typed_errors": 0, "crashes": 0, "crash_examples": []}
    kept: list = []
    rng = random.Random(seed)

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(fuzz_strategies())
    def case(payload):
        counts["cases"] += 1
        if len(kept) < keep:  # a uniform sample of the cases, to replay through the broker
            kept.append(payload)
        elif keep and (j := rng.randrange(counts["cases"])) < keep:
            kept[j] = payload
        try:
            service.validate(payload)
            counts["accepted"] += 1
        except InvalidRequest:
            counts["typed_errors"] += 1
        except Exception as exc:
            counts["crashes"] += 1
            if len(counts["crash_examples"]) < 5:
                counts["crash_examples"].append(f"{type(exc).__name__}: {exc} <- {repr(payload)[:200]}")

    case()
    counts["kept"] = kept
    return counts


def fuzz_through_broker(h: Harness, payloads: list, row: Row) -> dict:
    """Send fuzz cases as raw task messages (kwargs=..., and args=[...]) plus undecodable messages pushed onto
    the queue; every one is answered with a typed error or a result, and no worker restarts."""
    from scheduler.errors import InvalidRequest

    workers = [w for w in h.cluster.workers if w.alive() and w.model == "tiny"] or [h.start_worker("tiny")]
    pids = sorted(w.pid for w in workers)
    sent = []
    refused = 0
    for i, p in enumerate(payloads):
        if isinstance(p, dict) and "steps" not in p:
            p = {**p, "steps": 3}  # valid cases stay cheap
        elif isinstance(p, dict) and isinstance(p.get("steps"), int) and not isinstance(p.get("steps"), bool):
            p = {**p, "steps": max(-5, min(p["steps"], 3))}
        if isinstance(p, dict) and ("width" in p or "height" in p):
            p = {k: v for k, v in p.items() if k not in ("width", "height")} if i % 3 else p
        try:
            sent.append(h.send(p) if isinstance(p, dict) and i % 4 else h.send(None, args=[p]))
        except Exception:
            refused += 1  # not serialisable: the producer refuses it, nothing reaches a worker
    raw = _push_garbage(h)
    outcomes = _wait_all(h, sent, 180)
    from scheduler import errors

    typed = {
        name
        for name in dir(errors)
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), InvalidRequest)
    }
    answered_typed = sum(1 for o in outcomes if o["state"] == "FAILURE" and o.get("error") in typed)
    other_failures = [o for o in outcomes if o["state"] == "FAILURE" and o.get("error") not in typed]
    ok = sum(1 for o in outcomes if o["state"] == "SUCCESS")
    lost = [o for o in outcomes if o["state"] not in ("SUCCESS", "FAILURE")]
    alive = sorted(w.pid for w in workers if w.alive())
    after = _wait_all(h, [h.send({"prompt": "still alive after the fuzz", "steps": 3})], 60)
    return {
        "sent": len(sent),
        "refused_by_producer": refused,
        "results": ok,
        "typed_errors": answered_typed,
        "untyped_failures": [f"{o.get('error')}: {o.get('message')}" for o in other_failures][:5],
        "n_untyped": len(other_failures),
        "lost": len(lost),
        "raw_garbage_pushed": raw,
        "worker_restarts": int(alive != pids),
        "serves_after": after[0]["state"],
        "max_latency_s": max((o.get("latency_s") or 0) for o in outcomes) if outcomes else 0,
    }


def _push_garbage(h: Harness) -> int:
    """Messages no producer would send, pushed straight onto the queue."""
    import base64

    import redis

    r = redis.Redis.from_url(h.redis.url)

    def envelope(body, headers):
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "body_encoding": "base64",
                    "delivery_info": {"exchange": "", "routing_key": "reprise.tiny"},
                    "delivery_mode": 2,
                    "delivery_tag": str(uuid.uuid4()),
                    "priority": 0,
                },
            }
        )

    garbage = [
        b"not json at all",
        b"{}",
        b"[]",
        b"\xff\xfe\x00garbage",
        json.dumps({"body": "!!!", "properties": {}}).encode(),
        envelope(b"not-json", {"task": "reprise.generate", "id": str(uuid.uuid4())}).encode(),
        envelope(b'[[], {"prompt": "x"}, {}]', {"task": "reprise.no_such_task", "id": str(uuid.uuid4())}).encode(),
        envelope(b'{"a": 1}', {"task": "reprise.generate", "id": str(uuid.uuid4())}).encode(),
        envelope(b'[[], {"prompt": "x", "steps": 2}, {}]', {"task": "reprise.generate"}).encode(),
    ]
    for g in garbage:
        r.lpush("reprise.tiny", g)
    time.sleep(2)
    return len(garbage)


def fault_fuzz(h: Harness, row: Row, n: int) -> None:
    t = time.monotonic()
    counts = fuzz_in_process(n, keep=60 if h.quick else 300)
    kept = counts.pop("kept")
    row.check(
        "in-process: every case accepted or a typed InvalidRequest",
        counts["crashes"] == 0,
        counts["crash_examples"] or None,
    )
    row.checks["in-process counts"] = {
        "ok": True,
        "detail": {k: v for k, v in counts.items() if k != "crash_examples"},
        "seconds": round(time.monotonic() - t, 1),
    }
    broker = fuzz_through_broker(h, kept, row)
    row.sent = counts["cases"] + broker["sent"] + broker["raw_garbage_pushed"]
    row.completed = counts["accepted"] + broker["results"]
    row.failed = counts["typed_errors"] + broker["typed_errors"]
    row.lost = broker["lost"]
    row.max_latency_s = broker["max_latency_s"]
    row.check(
        "broker: every raw message answered with a result or a typed InvalidRequest",
        broker["n_untyped"] == 0 and broker["lost"] == 0,
        broker,
    )
    row.check(
        "broker: no worker crashed or restarted; still serving",
        broker["worker_restarts"] == 0 and broker["serves_after"] == "SUCCESS",
    )
    row.notes.append(
        "sent = in-process cases + raw messages through Redis + undecodable messages pushed on the queue "
        "(those have no result to wait for); failed = typed errors (the expected answer)"
    )
