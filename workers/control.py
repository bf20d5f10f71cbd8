"""The node's control channel: invalidation broadcasts drop in-process memos at once.

Correctness never depends on these messages: every lookup filters on the generation it reads
from Redis just before, so a node that misses a broadcast still serves nothing stale.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger("reprise.worker")


def drop_memos(service) -> None:
    memo = getattr(service, "text_memo", None)
    if memo is not None:
        memo.clear()
    if service.cache is not None and hasattr(service.cache, "drop_memos"):
        service.cache.drop_memos()


def start_control(service, redis_client, cluster) -> threading.Thread:
    channel = f"{cluster.queue_prefix}:invalidate"

    def listen() -> None:
        while True:
            try:
                pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                for message in pubsub.listen():
                    event = json.loads(message["data"])
                    log.info("invalidation: %s", event)
                    service.invalidations = getattr(service, "invalidations", 0) + 1
                    drop_memos(service)
            except Exception as exc:  # Redis restarting: resubscribe
                log.warning("control channel lost (%s); resubscribing", exc)
                time.sleep(1.0)

    thread = threading.Thread(target=listen, name="reprise-control", daemon=True)
    thread.start()
    return thread
