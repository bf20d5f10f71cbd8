"""`make demo` shows what its README shows: run the real command (its own redis-server, a worker, Flower,
the HTTP API) and read its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(420)
def test_the_demo_serves_exact_and_resumed_requests_and_answers_over_http(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REPRISE_REDIS_URL")}  # its own Redis
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "demo", "--steps", "25", "--workdir", str(tmp_path / "demo")],
        env={**env, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "started redis-server" in out and "write-backs drained" in out
    rows = re.findall(r"│ (a [^│]+?)\s+│ [\d.]+\s+│ (miss|exact|approximate \(K=(\d+), s=[\d.]+\))", out)
    assert [hit.split(" ")[0] for _, hit, _ in rows] == ["miss"] * 3 + ["exact", "approximate", "approximate"], out
    assert sorted(int(k) for _, _, k in rows if k) == [5, 13], out  # the re-roll and the edit, as the README shows
    assert re.search(r"POST /v1/images/generations .* cache exact", out), out
