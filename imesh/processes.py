"""Child processes of `imesh up` and of the tests: start, wait until ready, stop for sure.

Every process gets its own log file, because a mesh that fails to start must say why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class StartupError(RuntimeError):
    """A child did not become ready; the message carries the tail of its log."""


@dataclass
class ManagedProcess:
    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # A new session so that a Ctrl-C in the terminal reaches `imesh up`, which stops children in order.
        self.popen = subprocess.Popen(
            list(self.argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _live_popen(self) -> subprocess.Popen | None:
        """The child while it runs; None before `start` and after it exited."""
        return self.popen if self.running else None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
        if self.popen is None:
            raise RuntimeError(f"{self.name}: wait_until before start")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise StartupError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.05)
        raise StartupError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        popen = self._live_popen()
        if popen is None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()

    def kill(self) -> None:
        """Abrupt death, as a crash would be: for failure tests."""
        popen = self._live_popen()
        if popen is not None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs a module of this project with the current interpreter."""
    return [sys.executable, "-m", module, *args]


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=0.5).status_code == 200
