"""Every worker setting is checked at start (issue 21, item 7): a value the served model's family cannot
run, or one out of its bounds, stops the worker with a typed error naming the allowed values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scheduler.errors import InvalidWorkerSetting
from workers.model_loading import load_components
from workers.settings import WorkerSettings, load_worker_settings


@pytest.mark.parametrize(
    "model,profile,ok",
    [
        ("tiny", "deepcache", True),
        ("tiny", "recommended", True),
        ("tiny", "taylorseer", False),
        ("tiny-flux", "first_block", True),
        ("tiny-flux", "block", False),
        ("tiny-flux", "no-such-cache", False),
    ],
)
def test_feature_profile_is_checked_against_the_family(model, profile, ok):
    components = load_components(model)
    settings = WorkerSettings(model=model, feature_profile=profile)
    if ok:
        settings.check_for(components)
        return
    with pytest.raises(InvalidWorkerSetting) as err:
        settings.check_for(components)
    allowed = ["off", *components.family.feature_methods]
    assert err.value.details[0]["setting"] == "REPRISE_FEATURE_PROFILE"
    assert all(a in err.value.details[0]["allowed"] for a in allowed)
    assert "REPRISE_FEATURE_PROFILE" in str(err.value) and ", ".join(err.value.details[0]["allowed"]) in str(err.value)


@pytest.mark.parametrize("name", ["REPRISE_MAX_BATCH", "REPRISE_SWITCH_INTERVAL_MS"])
def test_a_value_out_of_bounds_is_a_typed_error_naming_the_variable(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    with pytest.raises(InvalidWorkerSetting) as err:
        load_worker_settings()
    assert err.value.details[0]["setting"] == name and name in str(err.value)


def test_the_switch_interval_setting_is_the_process_interpreter_lock_interval(monkeypatch):
    from workers.node import use_switch_interval

    before = sys.getswitchinterval()
    monkeypatch.setenv("REPRISE_SWITCH_INTERVAL_MS", "2.5")
    try:
        use_switch_interval(load_worker_settings())
        assert sys.getswitchinterval() == pytest.approx(0.0025)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize(
    "env,args,named",
    [
        ({"REPRISE_FEATURE_PROFILE": "block"}, ["--model", "tiny-flux", "--devices", "cpu"], "first_block, taylorseer"),
        ({"REPRISE_MAX_BATCH": "0"}, ["--model", "tiny", "--devices", "cpu"], "REPRISE_MAX_BATCH"),
        ({}, ["--model", "tiny", "--devices", "cpu,tpu"], "auto, cpu, sim"),
        ({"REPRISE_CACHE_POLICY": "newest"}, ["--model", "tiny", "--devices", "cpu"], "REPRISE_CACHE_POLICY"),
    ],
)
def test_the_worker_refuses_to_start_on_a_wrong_setting(env, args, named):
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "REPRISE_REDIS_URL": "redis://127.0.0.1:1/0", **env}
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", *args], capture_output=True, text=True, timeout=120, env=run_env
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error (invalid_worker_setting)" in proc.stderr and named in proc.stderr, proc.stderr[-2000:]
