"""The canary controller and its state, in process: weights arithmetic, the evidence windows, the
gates, persistence, and the controller driving a real ControlPlane (no Envoy connected, so a
change is acknowledged once it is persisted and built). Records are fed to the controller's sink
exactly as the access-log stream would; time is a test clock, so steps advance deterministically.

The same behaviour through Envoy, the fleet and the CLI is in test_e2e_canary.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from controlplane.canary.controller import CanaryController, GateReading, VersionWindows, judge, reconcile_overrides
from controlplane.canary.state import (
    MANUAL,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    WEIGHT_SCALE,
    CanaryState,
    Gates,
    canary_weights,
)
from controlplane.errors import Conflict, InvalidRequest
from controlplane.model.mesh_model import build_mesh_model
from controlplane.server import ControlPlane, ControlPlaneConfig
from controlplane.spec.schema import parse_spec
from controlplane.state.overrides import Overrides
from controlplane.state.store import STATE_FILE, StateStore
from controlplane.traffic.record import RequestRecord
from imesh.ports import free_ports

SPEC = """
pools: [{name: p}]
models:
  - name: chat
    versions:
      - {name: v1, weight: 100, endpoints: [{address: "127.0.0.1:1", pool: p}]}
      - {name: v2, weight: 0, endpoints: [{address: "127.0.0.1:2", pool: p}]}
  - name: solo
    versions:
      - {name: v1, endpoints: [{address: "127.0.0.1:3", pool: p}]}
"""


def record(version: str, status: int = 200, duration_s: float = 0.05, model: str = "chat") -> RequestRecord:
    return RequestRecord(
        model=model,
        version=version,
        endpoint="",
        pool="p",
        priority="standard",
        status=status,
        duration_s=duration_s,
        ttft_s=None,
        upstream_failure=False,
        shed=False,
        request_bytes=10,
        response_bytes=10,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- weights


def test_canary_weights_give_the_canary_its_share_and_keep_the_others_ratio():
    assert canary_weights({"v1": 100, "v2": 0}, ["v1", "v2"], "v2", 5) == {"v1": 9500, "v2": 500}
    three = canary_weights({"a": 60, "b": 30, "c": 0}, ["a", "b", "c"], "c", 10)
    assert three == {"a": 6000, "b": 3000, "c": 1000}
    odd = canary_weights({"a": 1, "b": 1, "c": 1, "d": 0}, ["a", "b", "c", "d"], "d", 0.01)
    assert sum(odd.values()) == WEIGHT_SCALE and odd["d"] == 1  # largest remainder: never drifts
    assert canary_weights({"v1": 100, "v2": 0}, ["v1", "v2"], "v2", 100) == {"v1": 0, "v2": WEIGHT_SCALE}
    # the others had no weight at all (the canary version had it all): they share equally
    assert canary_weights({"a": 0, "b": 0, "c": 7}, ["a", "b", "c"], "c", 50) == {"a": 2500, "b": 2500, "c": 5000}
    with pytest.raises(ValueError):
        canary_weights({"v1": 1}, ["v1", "v2"], "v2", 101)


# ---------------------------------------------------------------- evidence and gates


def test_windows_keep_watched_versions_and_read_since_a_time():
    clock = Clock()
    windows = VersionWindows(clock=clock)
    windows(record("v2"))  # not watched yet: dropped
    windows.watch(["chat"])
    for i in range(100):
        windows(record("v2", status=503 if i < 3 else 200, duration_s=0.01 * (i + 1)))
    windows(record("v1", model="solo"))  # another model: dropped
    reading = windows.reading("chat", "v2", since=0.0)
    assert (reading.samples, reading.errors) == (100, 3)
    assert reading.error_rate == pytest.approx(0.03)
    assert reading.p99_s == pytest.approx(0.99)  # nearest rank of 0.01..1.00
    clock.now += 10
    windows(record("v2", duration_s=5.0))
    assert windows.reading("chat", "v2", since=clock.now).samples == 1
    assert windows.reading("solo", "v1", since=0.0).samples == 0
    windows.watch([])
    assert windows.reading("chat", "v2", since=0.0).samples == 0


def test_an_upstream_failure_or_no_answer_counts_as_an_error_and_a_shed_does_not():
    windows = VersionWindows()
    windows.watch(["chat"])
    windows(RequestRecord("chat", "v2", "", "p", "standard", 200, 0.1, None, True, False, 0, 0))
    windows(RequestRecord("chat", "v2", "", "p", "standard", 0, 0.1, None, False, False, 0, 0))
    windows(RequestRecord("chat", "v2", "", "p", "standard", 429, 0.1, None, False, True, 0, 0))
    reading = windows.reading("chat", "v2", since=0.0)
    assert (reading.samples, reading.errors) == (3, 2)


def test_gates_wait_for_samples_then_judge_error_rate_and_p99():
    gates = Gates(max_error_rate=0.05, max_p99_s=1.0, min_samples=10)
    assert judge(gates, GateReading("v2", 9, 9, 9.0, 1.0))[0] == "wait"
    assert judge(gates, GateReading("v2", 100, 5, 0.5, 1.0))[0] == "pass"
    verdict, why = judge(gates, GateReading("v2", 100, 6, 0.5, 1.0))
    assert verdict == "fail" and "error rate 6.0% > 5.0%" in why and "6 of 100" in why
    verdict, why = judge(gates, GateReading("v2", 100, 0, 1.5, 1.0))
    assert verdict == "fail" and "p99 1.500s > 1s" in why


# ---------------------------------------------------------------- persistence


def test_canary_state_survives_the_store_and_old_state_files_still_load(tmp_path):
    spec = parse_spec(SPEC)
    store = StateStore(tmp_path, spec)
    state = CanaryState(
        "chat",
        "v2",
        PROGRESSING,
        25.0,
        None,
        {"v1": 100, "v2": 0},
        steps=(5.0, 25.0),
        step=1,
        interval_s=30.0,
        gates=Gates(0.01, 2.0, 20),
    ).with_event(1.0, "started")
    store.commit(overrides=Overrides(weights={"chat": {"v1": 7500, "v2": 2500}}, canaries={"chat": state}))
    store.close()  # a store holds its directory's lock
    reopened = StateStore(tmp_path, spec)
    assert reopened.state.overrides.canaries == {"chat": state}
    reopened.close()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed over, not left behind

    document = json.loads((tmp_path / STATE_FILE).read_text())  # as written before canaries existed
    del document["overrides"]["canaries"]
    (tmp_path / STATE_FILE).write_text(json.dumps(document))
    store = StateStore(tmp_path, spec)
    restored = store.state
    store.close()
    assert restored.overrides.canaries == {} and restored.overrides.weights == {"chat": {"v1": 7500, "v2": 2500}}


def test_a_spec_that_changes_weights_wins_over_overrides_unless_a_canary_is_in_progress():
    old = parse_spec(SPEC)
    new = parse_spec(SPEC.replace("weight: 0", "weight: 50"))
    overrides = Overrides(weights={"chat": {"v1": 9000, "v2": 1000}})
    assert reconcile_overrides(old, new, overrides).weights == {}
    assert reconcile_overrides(old, old, overrides).weights == overrides.weights  # unchanged model: kept
    active = CanaryState("chat", "v2", MANUAL, 10.0, None, {"v1": 100, "v2": 0})
    with pytest.raises(Conflict, match="canary of chat/v2 is in progress"):
        reconcile_overrides(old, new, Overrides(weights=overrides.weights, canaries={"chat": active}))
    done = CanaryState("chat", "v2", ROLLED_BACK, 0.0, None, {"v1": 100, "v2": 0})
    kept = reconcile_overrides(old, new, Overrides(canaries={"chat": done}))
    assert kept.canaries == {"chat": done}  # history stays


# ---------------------------------------------------------------- the controller on a real control plane


async def start_control_plane(state_dir, clock: Clock) -> ControlPlane:
    cp = ControlPlane(
        ControlPlaneConfig(
            spec=parse_spec(SPEC),
            state_dir=state_dir,
            grpc_port=free_ports(1)[0],
            debounce_s=0.0,
            scrape_interval_s=1.0,
        )
    )
    # The test drives the steps: a controller on the test clock whose own loop never ticks again.
    cp.canary = CanaryController(cp, clock=clock, tick_s=3600.0)
    await cp.start()
    return cp


def weights(cp: ControlPlane) -> dict[str, int]:
    model = build_mesh_model(cp.store.state.spec, cp.store.state.overrides).model("chat")
    return {v.name: v.weight for v in model.versions}


async def test_set_promote_and_rollback(tmp_path):
    cp = await start_control_plane(tmp_path, Clock())
    try:
        version_before = cp.config_version
        version, state = await cp.canary.set_percent("chat", "v2", 5)
        assert version > version_before and state.phase == MANUAL
        assert weights(cp) == {"v1": 9500, "v2": 500}
        await cp.canary.set_percent("chat", "v2", 30)
        assert weights(cp) == {"v1": 7000, "v2": 3000}

        _, promoted = await cp.canary.promote("chat")
        assert promoted.phase == PROMOTED and promoted.previous_stable == "v1"
        assert weights(cp) == {"v1": 0, "v2": WEIGHT_SCALE}

        _, rolled = await cp.canary.rollback("chat")  # undoes the promotion: the spec's weights again
        assert rolled.phase == ROLLED_BACK and weights(cp) == {"v1": 100, "v2": 0}
        assert cp.store.state.overrides.weights == {}
        assert [e.message.split(":")[0] for e in rolled.history] == [
            "canary v2 set to 5%",
            "canary v2 set to 30%",
            "promoted by the operator",
            "rolled back",
        ]
    finally:
        await cp.stop()


async def test_operations_refuse_clearly(tmp_path):
    cp = await start_control_plane(tmp_path, Clock())
    try:
        with pytest.raises(InvalidRequest, match=r"unknown model 'nope' \(models: chat, solo\)"):
            await cp.canary.set_percent("nope", "v2", 5)
        with pytest.raises(InvalidRequest, match=r"has no version 'v9' \(versions: v1, v2\)"):
            await cp.canary.set_percent("chat", "v9", 5)
        with pytest.raises(InvalidRequest, match="only version"):
            await cp.canary.set_percent("solo", "v1", 5)
        with pytest.raises(InvalidRequest, match="between 0 and 100"):
            await cp.canary.set_percent("chat", "v2", 120)
        with pytest.raises(Conflict, match="no canary in progress for chat"):
            await cp.canary.promote("chat")
        with pytest.raises(Conflict, match="no canary of chat to roll back"):
            await cp.canary.rollback("chat")
        await cp.canary.set_percent("chat", "v2", 5)
        with pytest.raises(Conflict, match="canary of chat/v2 is in progress"):
            await cp.canary.set_percent("chat", "v1", 50)
        with pytest.raises(InvalidRequest, match="steps must increase"):
            await cp.canary.start_progressive("chat", "v2", [50, 25], 1.0, Gates())
    finally:
        await cp.stop()


async def test_progressive_canary_steps_through_healthy_gates_to_promotion(tmp_path):
    clock = Clock()
    cp = await start_control_plane(tmp_path, clock)
    try:
        await cp.canary.start_progressive("chat", "v2", [10, 50], 30.0, Gates(0.02, 1.0, 5))
        assert weights(cp) == {"v1": 9000, "v2": 1000}
        for _ in range(10):
            cp.canary.windows(record("v2"))
        await cp.canary.tick()  # gates pass, but the interval is not over
        assert cp.store.state.overrides.canaries["chat"].step == 0
        assert "s left" in cp.canary.status("chat")[0].waiting_for

        clock.now += 31
        await cp.canary.tick()
        state = cp.store.state.overrides.canaries["chat"]
        assert (state.phase, state.step, state.percent) == (PROGRESSING, 1, 50.0)
        assert weights(cp) == {"v1": 5000, "v2": 5000}

        clock.now += 31
        await cp.canary.tick()  # the new step has no evidence of its own yet: it waits
        assert "waiting for samples: 0/5" in cp.canary.status("chat")[0].waiting_for
        for _ in range(10):
            cp.canary.windows(record("v2", duration_s=0.2))
        await cp.canary.tick()
        state = cp.store.state.overrides.canaries["chat"]
        assert state.phase == PROMOTED and weights(cp) == {"v1": 0, "v2": WEIGHT_SCALE}
        assert "all 2 steps passed" in state.history[-1].message
    finally:
        await cp.stop()


async def test_progressive_canary_rolls_back_at_once_when_a_gate_fails(tmp_path):
    clock = Clock()
    cp = await start_control_plane(tmp_path, clock)
    try:
        await cp.canary.start_progressive("chat", "v2", [10, 50], 30.0, Gates(0.05, 0.0, 10))
        for i in range(20):
            cp.canary.windows(record("v2", status=500 if i % 2 else 200))
        await cp.canary.tick()  # mid-interval: a failed gate does not wait for the interval's end
        state = cp.store.state.overrides.canaries["chat"]
        assert state.phase == ROLLED_BACK
        assert "step 1/2 at 10%: error rate 50.0% > 5.0% (10 of 20 requests failed)" in state.reason
        assert weights(cp) == {"v1": 100, "v2": 0}
    finally:
        await cp.stop()


async def test_a_progressive_canary_resumes_at_its_step_after_a_restart(tmp_path):
    clock = Clock()
    cp = await start_control_plane(tmp_path, clock)
    try:
        await cp.canary.start_progressive("chat", "v2", [10, 50, 100], 30.0, Gates(0.05, 0.0, 1))
        cp.canary.windows(record("v2"))
        clock.now += 31
        await cp.canary.tick()
        assert cp.store.state.overrides.canaries["chat"].step == 1
        version = cp.config_version
    finally:
        await cp.stop()

    cp = await start_control_plane(tmp_path, clock)
    try:
        await asyncio.wait_for(cp.canary.resumed.wait(), 10)
        state = cp.store.state.overrides.canaries["chat"]
        assert (state.phase, state.step, state.percent) == (PROGRESSING, 1, 50.0)
        assert weights(cp) == {"v1": 5000, "v2": 5000}
        assert cp.config_version >= version  # never backwards across a restart
        assert any("control plane restarted: resuming step 2/3 at 50%" in e.message for e in state.history)
        cp.canary.windows(record("v2"))
        clock.now += 31
        await cp.canary.tick()
        assert cp.store.state.overrides.canaries["chat"].step == 2
    finally:
        await cp.stop()


# ---------------------------------------------------------------- CLI parsing and completion


def test_cli_parses_percentages_and_durations():
    from imesh.commands.canary import parse_duration, parse_percent

    assert [parse_percent(t) for t in ("5", "5%", "0.5%", "100")] == [5.0, 5.0, 0.5, 100.0]
    assert [parse_duration(t) for t in ("30s", "1.5m", "500ms", "2", "1h")] == [30.0, 90.0, 0.5, 2.0, 3600.0]
    for bad in ("101", "-1", "five"):
        with pytest.raises(ValueError):
            parse_percent(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_shell_completion_script_and_completions():
    import os
    import subprocess
    import sys
    from pathlib import Path

    imesh = str(Path(sys.executable).parent / "imesh")
    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run([imesh, "completion", shell], capture_output=True, text=True, timeout=30)
        assert script.returncode == 0 and "_IMESH_COMPLETE" in script.stdout
    env = {**os.environ, "_IMESH_COMPLETE": "bash_complete", "COMP_WORDS": "imesh canary pro", "COMP_CWORD": "2"}
    completed = subprocess.run([imesh], env=env, capture_output=True, text=True, timeout=30)
    assert "promote" in completed.stdout
