"""What a load run reports: the table, the plots (latency CDF, throughput and queue depth over time, hit rate over time) and Flower's counts for the same jobs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ops.load_run import READY


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"loadtest {report['label']}: {report['sent']} sent, {report['succeeded']} succeeded, "
        f"{report['throughput_jobs_s']:.2f} jobs/s"
    )
    table.add_column("latency (s)")
    for c in ("p50", "p95", "p99", "mean"):
        table.add_column(c, justify="right")
    for name, p in report["latency_s"].items():
        table.add_row(name, *(f"{p[c]:.3f}" if p[c] is not None else "-" for c in ("p50", "p95", "p99", "mean")))
    console = Console()
    console.print(table)
    cache = report["cache"]
    console.print(
        "hit rate: "
        + ", ".join(f"{k} {v:.1%}" for k, v in cache["hit_rate"].items() if v)
        + f"; approximate by K: {cache['approximate_by_k'] or '-'}; steps saved {cache['steps_saved']} of "
        f"{cache['steps_requested']} ({cache['steps_saved_fraction']:.1%})"
    )
    console.print(f"errors: {report['errors'] or 'none'}; workload: {report['workload']['generated']}")
    if report.get("flower"):
        console.print(f"flower: {report['flower']}")


def write_plots(reports: list[dict], directory: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rep in reports:
        s = rep["series"]
        for key, style in (("end_to_end_s", "-"), ("queue_wait_s", "--"), ("service_s", ":")):
            v = s[key]
            if v:
                ax.plot(
                    v,
                    [(i + 1) / len(v) for i in range(len(v))],
                    style,
                    label=f"{rep['label']} {key[:-2].replace('_', ' ')}",
                )
    _label(ax, "Latency CDF", "seconds", "fraction of jobs")
    paths.append(_save(fig, directory / "latency_cdf.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for rep in reports:
        s = rep["series"]
        if s["t"]:  # one more edge so the last bin shows as a step too
            top.step(
                s["t"] + [s["t"][-1] + s["bin_s"]],
                s["throughput_jobs_s"] + s["throughput_jobs_s"][-1:],
                where="post",
                label=rep["label"],
            )
        if s["queue_depth"]:
            bottom.plot([t for t, _ in s["queue_depth"]], [d for _, d in s["queue_depth"]], label=rep["label"])
    _label(top, "Throughput and queue depth over time", None, "jobs/s completed")
    _label(bottom, None, "seconds since start", "jobs queued")
    paths.append(_save(fig, directory / "throughput_queue.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for rep in reports:
        s = rep["series"]
        pts = [(t, h) for t, h in zip(s["t"], s["hit_rate"]) if h is not None]
        (line,) = ax.plot(
            [t for t, _ in pts],
            [h for _, h in pts],
            marker=".",
            alpha=0.5,
            label=f"{rep['label']} per {s['bin_s']:.0f}s",
        )
        hits = done = 0
        cumulative = []
        for h, d in zip(s["hit_rate"], s["throughput_jobs_s"]):
            n = d * s["bin_s"]
            done, hits = done + n, hits + (h or 0) * n
            cumulative.append(hits / done if done else None)
        ax.plot(s["t"], cumulative, color=line.get_color(), linewidth=2, label=f"{rep['label']} cumulative")
    ax.set_ylim(-0.02, 1.02)
    _label(ax, "Hit rate over time", "seconds since start", "cache hit rate (exact + approximate)")
    paths.append(_save(fig, directory / "hit_rate.png"))
    return paths


def _label(ax, title: str | None, xlabel: str | None, ylabel: str) -> None:
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def flower_counts(url: str, auth: tuple[str, str] | None, job_ids: list[str], wait_s: float = 15.0) -> dict:
    """What Flower recorded for these job ids: how many it saw and how many it shows as SUCCESS."""
    import requests

    wanted = set(job_ids)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            tasks = requests.get(url.rstrip("/") + "/api/tasks", auth=auth, timeout=10, params={"limit": 100000}).json()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        ours = {i: t for i, t in tasks.items() if i in wanted}
        states = Counter(t.get("state") for t in ours.values())
        settled = all(t.get("state") in READY for t in ours.values())
        if (len(ours) == len(wanted) and settled) or time.monotonic() > deadline:
            return {"seen": len(ours), "succeeded": states.get("SUCCESS", 0), "states": dict(states)}
        time.sleep(1.0)
