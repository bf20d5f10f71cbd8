"""Row secrets: no secret in the repository, the logs or the results."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ops.faults.harness import Harness, Row


def fault_secrets(h: Harness, row: Row) -> None:
    """The Redis password is in every process's URL: it must appear in no log; and no secret is committed."""
    logs = sorted(h.workdir.glob("*.log"))
    leaks = {p.name: p.read_text(errors="replace").count(h.redis.password) for p in logs}
    worker_leaks = {k: v for k, v in leaks.items() if k.startswith("worker") and v}
    other_leaks = {k: v for k, v in leaks.items() if not k.startswith("worker") and v}
    masked = any(":**@" in p.read_text(errors="replace") for p in logs if p.name.startswith("worker"))
    row.sent = len(logs)
    row.check(
        "no worker log holds the Redis password",
        not worker_leaks,
        worker_leaks or {"logs_checked": len(leaks), "celery_masks": masked},
    )
    row.check("no other process log holds it", not other_leaks, other_leaks or None)
    row.check("no secret committed to the repository", not (found := scan_repo()), found[:10] or None)


SECRET_PATTERNS = [
    re.compile(r"redis://[^:/\s]*:(?!\*\*@)[^@\s/'\"{}]{3,}@"),
    re.compile(r"(?i)(password|passwd|secret|api[_-]?key|token)\s*[:=]\s*['\"][A-Za-z0-9+/_\-]{12,}['\"]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9]{32,})\b"),
]


# Fixed credentials of the local demo and load test (a Flower they start on 127.0.0.1): not secrets.
DEMO_VALUES = re.compile(r"(?i)demo|test|example|changeme|dummy|placeholder")


def scan_repo(root: str | None = None) -> list[str]:
    root = root or str(Path(__file__).resolve().parents[1])
    try:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        files = []
    found = []
    for name in files:
        path = Path(root) / name
        if (
            path.suffix in (".png", ".safetensors", ".bin", ".pt")
            or not path.is_file()
            or path.stat().st_size > 2_000_000
        ):
            continue
        text = path.read_text(errors="replace")
        for pattern in SECRET_PATTERNS:
            for m in pattern.finditer(text):
                if not DEMO_VALUES.search(m.group(0)):
                    found.append(f"{name}: {m.group(0)[:60]}")
    return found


# =============================================================================================
