"""Whether a node's approximate lookups pay for themselves (issue 26, the CPU node).

An approximate lookup costs its prompt's embedding and a search before it can save anything, and its hit
saves K steps of one request. On a node of accelerators the embedding runs beside the devices and a hit
is worth far more than the lookup. On a node whose devices are the host's own cores, every millisecond of
MiniLM is a millisecond taken from a device: there a `tiny` request step costs about 6 ms of device time
(docs/measured.md), a Krea prompt's embedding about 13 ms, and on real prompt streams well under one
lookup in ten hits, so the lookups cost the node several times what their hits save.

The gate measures both sides on the node, in the same unit (seconds), over a decaying window:

- **cost**: the lookup stage's wall time for its lookups (filter counts, embeddings, searches, the prompts
  embedded ahead), which on such a node is time the device waits for a core or the interpreter lock;
- **value**: for each approximate hit that resumed a request, the steps it skipped (less any discarded)
  times the device's measured seconds per request step (``DeviceStats.request_step_s``).

While the value covers the cost, or for the first ``warmup`` lookups, every approximate lookup is made.
Otherwise the gate is closed: one lookup in ``probe_every`` is still made (a probe, so the estimate
follows the stream), and the others are answered at once, unembedded (``lookup_gated``); their
write-backs are stored without a prompt vector (exact hits still find them; approximate searches do
not), so nothing of MiniLM runs for them at all, and without states, which nothing could resume from (the
request captures none: GenerationService.on_device). Probes then search a store whose recent entries mostly
have no vector, so their hits are scaled up by the share of recent write-backs stored with one
(``coverage``): a hit that one entry in eight could give is counted eight times.

Why hand-written: no library decides this; it is a ratio of two counters, in plain Python.
"""

from __future__ import annotations

import threading

MODES = ("auto", "on", "off")


class ApproxGate:
    """Open (look up) or closed (probe only), from decayed sums of cost and value (module docstring)."""

    def __init__(self, enabled: bool, warmup: int = 32, window: int = 256, probe_every: int = 16):
        if warmup < 0 or window < 1 or probe_every < 1:
            raise ValueError(f"ApproxGate: warmup {warmup} >= 0, window {window} >= 1, probe_every {probe_every} >= 1")
        self.enabled, self.warmup, self.probe_every = enabled, warmup, probe_every
        self._decay = 1.0 - 1.0 / window
        self._lock = threading.Lock()
        self.lookups = 0  # every lookup the stage made (warm-up, open or probe)
        self._cost = 0.0  # decayed seconds of lookup work
        self._value = 0.0  # decayed device seconds saved by approximate hits
        self._written = 0.0  # decayed write-backs, and those stored with a vector
        self._with_vector = 0.0
        self._asked = 0  # admit() calls while closed, for the probe turn

    def _coverage(self) -> float:  # under self._lock
        return self._with_vector / self._written if self._written else 1.0

    @property
    def coverage(self) -> float:
        """Share of recent write-backs stored with a prompt vector (1 before any)."""
        with self._lock:
            return self._coverage()

    @property
    def is_open(self) -> bool:
        if not self.enabled:
            return True
        with self._lock:
            if self.lookups < self.warmup:
                return True
            return self._value / max(self._coverage(), 1.0 / self.probe_every) >= self._cost

    def admit(self) -> bool:
        """Whether this request's approximate lookup is made: always while open, one in ``probe_every`` else."""
        if self.is_open:
            return True
        with self._lock:
            self._asked += 1
            return self._asked % self.probe_every == 0

    def note_lookups(self, n: int) -> None:
        """``n`` lookups taken up (counted before they are answered, so the next admission sees them)."""
        with self._lock:
            self.lookups += n
            scale = self._decay**n
            self._cost *= scale
            self._value *= scale

    def note_cost(self, seconds: float) -> None:
        """Seconds of lookup work: a batch's, or prompts embedded ahead or by the writer for earlier ones."""
        with self._lock:
            self._cost += max(0.0, seconds)

    def note_saved(self, seconds: float) -> None:
        """An approximate hit saved ``seconds`` of device time."""
        with self._lock:
            self._value += max(0.0, seconds)

    def note_write(self, with_vector: bool) -> None:
        with self._lock:
            self._written = self._written * self._decay + 1.0
            self._with_vector = self._with_vector * self._decay + (1.0 if with_vector else 0.0)

    def snapshot(self) -> dict:
        """For the node's stats: whether open, the decayed sums and the coverage."""
        is_open = self.is_open
        with self._lock:
            return {
                "enabled": self.enabled,
                "open": is_open,
                "lookups": self.lookups,
                "cost_s": round(self._cost, 4),
                "value_s": round(self._value, 4),
                "coverage": round(self._coverage(), 4),
            }
