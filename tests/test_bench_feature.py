"""`reprise bench feature --engine`, in a few seconds on `tiny`: DeepCache and plain requests run batched in the
node engine and alone, and the report carries what the README's table shows."""

from __future__ import annotations

from ops.bench_feature import run_engine


def test_bench_feature_engine_batches_deepcache_and_plain_and_reports_both_modes():
    report = run_engine("tiny", steps=9, size=64, concurrent=3, stagger=2, interval=3, repeats=1, log=lambda *_: None)
    rows = {(r["setting"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(s, m) for s in ("off", "deepcache interval 3") for m in ("batched", "alone")}
    assert rows["off", "batched"]["mean_batch"] > 1 and rows["deepcache interval 3", "batched"]["mean_batch"] > 1
    assert rows["off", "alone"]["mean_batch"] == rows["deepcache interval 3", "alone"]["mean_batch"] == 1
    assert rows["deepcache interval 3", "batched"]["full_partial_passes"] == (3, 6)  # steps 0, 3, 6 full
    assert rows["off", "batched"]["full_partial_passes"] == (9, 0)
    assert rows["off", "alone"]["max_abs_diff_vs_plain_alone"] == 0
    assert all(r["device_cpu_s"] > 0 and r["speedup_vs_plain_same_mode"] > 0 for r in rows.values())
