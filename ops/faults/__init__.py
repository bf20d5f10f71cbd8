"""The fault suite: inject each fault for real and count what users would see.

    python -m ops.faults --json faults.json            # everything (make faults), a few minutes
    python -m ops.faults --only worker_kill,redis_restart --quick

Everything is real: a password-protected redis-server of its own (append-only, on a spare port),
worker processes (`reprise worker`), coordinator processes. Faults that need a precise moment inside a
process (SIGKILL during decode, a slow Qdrant, a full disk, a skewed clock) are injected by running the
real command under `python -m ops.faults --with-hooks <reprise args>`, which patches the named points
from REPRISE_FAULT_* variables before handing over to `ops.cli`:

- REPRISE_FAULT_KILL_AT=load|denoise|decode|artifact|writeback, REPRISE_FAULT_KILL_ON=N: SIGKILL itself
  at that point of its N-th job (artifact: after half the PNG bytes reached the temporary file;
  writeback: right after the cache insert). A denoise death journals the engine's record of the call in
  flight (the job ids of every request batched in it).
- REPRISE_FAULT_STALL_ON=N: the N-th denoiser call of the process never returns (a hung kernel): the
  engine's watchdog must find it (REPRISE_DEVICE_STALL_S).
- REPRISE_FAULT_CACHE_DELAY_MS (while REPRISE_FAULT_CACHE_DELAY_FILE exists): every cache lookup sleeps first.
- REPRISE_FAULT_ARTIFACT_FULL_FILE: while it exists, artifact writes fail with ENOSPC.
- REPRISE_FAULT_CLOCK_SKEW_S: every local clock of the process is off by this much: the wall clock
  (time.time, time.time_ns) and the monotonic clock (time.monotonic, time.monotonic_ns), the one the
  cache clock (RedisClock) and the coordinator's pacing read. With REPRISE_FAULT_CLOCK_SKEW_FILE the
  wall clock steps by that much while the file exists (an NTP step, a resumed VM) and the monotonic
  clock is left alone (it never steps).
- REPRISE_FAULT_CLOCK_NAIVE=1: the broken implementation the clock_skew checks must catch: coordinator
  leases kept on each node's wall clock (LocalClockLease) and the cache clock = the node's wall clock.
- REPRISE_FAULT_JOURNAL: one JSON line per job start and end (pid, seed, sha256 of the image).

Counting, per fault: sent (send_task returned: "accepted"), completed (SUCCESS), failed (a typed
error, where that is the expected answer), lost (accepted, and neither within the deadline),
duplicated (one job id whose executions stored two different images, or whose result names an image
that differs from what it computed, or whose image is unreadable), retried (job ids that started more
than once), max latency (accepted → result stored).
"""
