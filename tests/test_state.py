"""Crash-safe state: a damaged state file is reported and survived, and one control plane owns a directory.

The store is exercised directly, then the real control-plane process, to check that what an
operator sees is one clear line and an exit status, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from controlplane.errors import StateError
from controlplane.spec.schema import parse_spec
from controlplane.state.overrides import Overrides
from controlplane.state.store import CORRUPT_SUFFIX, PREVIOUS_SUFFIX, STATE_FILE, StateStore
from imesh.ports import free_ports

SPEC = """
pools: [{name: gpu}]
models:
  - name: chat
    versions:
      - name: v1
        weight: 100
        endpoints: [{address: "127.0.0.1:9001", pool: gpu}, {address: "127.0.0.1:9002", pool: gpu}]
"""


def _store_with_two_changes(state_dir: Path) -> None:
    store = StateStore(state_dir, parse_spec(SPEC))
    store.commit(overrides=Overrides(weights={"chat": {"v1": 10000}}))  # version 2
    store.commit(overrides=Overrides(drained=frozenset({"127.0.0.1:9002"})))  # version 3
    store.close()


def test_every_write_keeps_the_previous_good_copy(tmp_path):
    _store_with_two_changes(tmp_path)
    current = json.loads((tmp_path / STATE_FILE).read_text())
    previous = json.loads((tmp_path / (STATE_FILE + PREVIOUS_SUFFIX)).read_text())
    assert (current["version"], previous["version"]) == (3, 2)
    assert not list(tmp_path.glob(".*"))  # no temp or staging file left behind


def test_a_truncated_state_file_resumes_from_the_previous_copy(tmp_path, caplog):
    _store_with_two_changes(tmp_path)
    path = tmp_path / STATE_FILE
    damaged = path.read_bytes()[:40]
    path.write_bytes(damaged)
    store = StateStore(tmp_path, parse_spec("models: []"))  # the spec given is not used: state wins
    assert store.state.version == 2 and store.state.overrides.weights == {"chat": {"v1": 10000}}
    assert store.restored
    assert (tmp_path / (STATE_FILE + CORRUPT_SUFFIX)).read_bytes() == damaged  # kept for inspection
    assert "not valid JSON" in caplog.text and "the last change is lost" in caplog.text
    store.commit()  # and it goes on from there
    store.close()
    assert json.loads(path.read_text())["version"] == 3


def test_a_crash_between_the_two_renames_resumes_from_the_previous_copy(tmp_path):
    _store_with_two_changes(tmp_path)
    (tmp_path / STATE_FILE).unlink()  # what a crash after linking .prev and before the rename leaves
    store = StateStore(tmp_path, parse_spec(SPEC))
    assert store.state.version == 2
    store.close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda doc: b"{", "not valid JSON"),
        (lambda doc: json.dumps({**doc, "version": "three"}).encode(), "version: Input should be a valid integer"),
        (
            lambda doc: json.dumps({k: v for k, v in doc.items() if k != "spec_yaml"}).encode(),
            "spec_yaml: Field required",
        ),
        (lambda doc: json.dumps({**doc, "spec_yaml": "models: 7"}).encode(), "holds a spec that no longer parses"),
        (lambda doc: b"\xff\xfe", "not valid JSON"),
    ],
)
def test_damage_with_no_good_copy_is_refused_with_the_file_and_what_is_wrong(tmp_path, damage, message):
    store = StateStore(tmp_path, parse_spec(SPEC))  # version 1 only: no previous copy yet
    store.close()
    path = tmp_path / STATE_FILE
    path.write_bytes(damage(json.loads(path.read_text())))
    with pytest.raises(StateError) as refused:
        StateStore(tmp_path, parse_spec(SPEC))
    text = str(refused.value)
    assert str(path) in text and message in text
    assert f"mv {path} {path}.bad" in text  # and how to proceed
    StateStore(tmp_path / "other", parse_spec(SPEC)).close()  # the refused store let go of nothing else
    # the refusal released the lock: after moving the file away, a store starts afresh
    path.rename(tmp_path / "moved")
    assert StateStore(tmp_path, parse_spec(SPEC)).state.version == 1


def test_a_second_store_on_one_directory_is_refused_until_the_first_closes(tmp_path):
    first = StateStore(tmp_path, parse_spec(SPEC))
    with pytest.raises(StateError, match=r"in use by another control plane \(pid \d+\)"):
        StateStore(tmp_path, parse_spec(SPEC))
    first.close()
    StateStore(tmp_path, parse_spec(SPEC)).close()


# ---------------------------------------------------------------- the real process


def _control_plane(spec: Path, state_dir: Path) -> tuple[subprocess.Popen, int]:
    grpc_port, metrics_port, listener_port = free_ports(3)
    argv = [
        sys.executable,
        "-m",
        "controlplane",
        f"--spec={spec}",
        f"--state-dir={state_dir}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--listener-port={listener_port}",
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), metrics_port


def _wait_ready(process: subprocess.Popen, metrics_port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"control plane not ready: {process.poll()}")


def test_the_process_refuses_a_shared_directory_and_a_damaged_file_without_a_traceback(tmp_path):
    spec = tmp_path / "mesh.yaml"
    spec.write_text(SPEC)
    state_dir = tmp_path / "state"
    first, metrics_port = _control_plane(spec, state_dir)
    try:
        _wait_ready(first, metrics_port)
        second, _ = _control_plane(spec, state_dir)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert f"state directory {state_dir} is in use by another control plane (pid {first.pid})" in err
        assert "Traceback" not in err
    finally:
        first.terminate()
        first.communicate(timeout=30)
    (state_dir / STATE_FILE).write_text('{"version": 1, "spec_')  # no previous copy: refused
    third, _ = _control_plane(spec, state_dir)
    _, err = third.communicate(timeout=60)
    assert third.returncode == 2 and "Traceback" not in err
    assert f"error: state file {state_dir / STATE_FILE} is damaged: not valid JSON" in err
