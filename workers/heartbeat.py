"""The node's heartbeat: its entry in the model registry, refreshed while it lives."""

from __future__ import annotations

import logging
import threading

from scheduler.registry import ModelRegistry

log = logging.getLogger("reprise.worker")


class Heartbeat(threading.Thread):
    """Keeps the model's entry in the registry alive while this node serves it."""

    def __init__(self, registry: ModelRegistry, model: str, info: dict, every_s: float):
        super().__init__(name="reprise-heartbeat", daemon=True)
        self.registry, self.model, self.info, self.every_s = registry, model, info, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.registry.announce(self.model, self.info, ttl_s=self.every_s * 3)
                if self.info.get("node"):
                    self.registry.announce_node(self.info["node"], self.info, ttl_s=self.every_s * 3)
            except Exception as exc:  # Redis restarting: try again next beat
                log.warning("heartbeat failed: %s", exc)
            self.stopped.wait(self.every_s)
