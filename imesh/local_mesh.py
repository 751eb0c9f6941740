"""The whole mesh on one machine: control plane, ext_proc, Envoy and, for the demo, a simulated fleet.

`imesh up` and the end-to-end tests both use this, so the tests exercise exactly what users run:
separate processes talking real gRPC and HTTP over loopback.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from imesh.envoy_process import DEFAULT_XDS_API, admin_ready, envoy_process
from imesh.ports import MeshPorts, free_ports
from imesh.processes import ManagedProcess, StartupError, http_ok, python_module

REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "examples" / "demo" / "mesh.yaml"
DEMO_FLEET = REPO / "examples" / "demo" / "fleet.yaml"


@dataclass
class LocalMesh:
    spec: Path
    workdir: Path
    ports: MeshPorts = MeshPorts()
    fleet_config: Path | None = None
    envoy_concurrency: int = 1
    xds_api: str = DEFAULT_XDS_API  # how Envoy speaks ADS: "delta" or "sotw" (docs/xds.md)
    extproc_workers: int = 1
    scrape_interval_s: float = 0.1
    controlplane_args: tuple[str, ...] = ()  # extra flags, e.g. ("--access-log-flush", "0.1")
    extproc_args: tuple[str, ...] = ()
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _extproc_ports: tuple[int, ...] = ()

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0) -> LocalMesh:
        try:
            if self.fleet_config is not None:
                self.start_fleet(timeout_s)
            self.start_control_plane(timeout_s)
            self.start_extproc(timeout_s)
            self.start_envoy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def drain(self, window_s: float) -> int:
        """Stop taking requests and let those in flight finish, for at most `window_s`.

        Envoy's listeners close (new connections are refused), while requests on open connections,
        streams included, run to their end. Returns how many were still active when the window
        ended (0: all finished). A no-op when Envoy is not running.
        """
        envoy = self.processes.get("envoy")
        if envoy is None or not envoy.running:
            return 0
        try:
            httpx.post(f"{self.admin_url}/drain_listeners", timeout=5.0)
        except httpx.HTTPError:
            return 0
        deadline = time.monotonic() + window_s
        active = self._active_requests()
        while active and time.monotonic() < deadline:
            time.sleep(0.1)
            active = self._active_requests()
        return active

    def _active_requests(self) -> int:
        try:
            text = httpx.get(f"{self.admin_url}/stats?filter=^http\\.imesh\\.downstream_rq_active$", timeout=2.0).text
        except httpx.HTTPError:
            return 0
        _, _, value = text.strip().partition(": ")
        return int(value) if value.isdigit() else 0

    def stop(self) -> None:
        # Reverse start order: the data plane goes first so clients see a clean refusal.
        for name in ("envoy", "extproc", "controlplane", "fleet"):
            process = self.processes.get(name)
            if process is not None:
                process.stop()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ components

    def start_fleet(self, timeout_s: float = 30.0) -> ManagedProcess:
        process = self._spawn("fleet", python_module("fleet", "--config", str(self.fleet_config)))
        process.wait_until(lambda: "fleet ready" in process.log_tail(5), timeout_s)
        return process

    def start_control_plane(self, timeout_s: float = 30.0) -> ManagedProcess:
        p = self.ports
        argv = python_module(
            "controlplane",
            "--spec",
            str(self.spec),
            "--state-dir",
            str(self.state_dir),
            "--host",
            p.host,
            "--grpc-port",
            str(p.control_plane),
            "--metrics-port",
            str(p.control_plane_metrics),
            "--listener-port",
            str(p.listener),
            "--scrape-interval",
            str(self.scrape_interval_s),
            *self.controlplane_args,
        )
        process = self._spawn("controlplane", argv)
        process.wait_until(http_ok(f"http://{p.host}:{p.control_plane_metrics}/readyz"), timeout_s)
        return process

    @property
    def extproc_ports(self) -> tuple[int, ...]:
        """One gRPC port per ext_proc worker: ``ports.extproc``, then free ones. Envoy's bootstrap
        lists them all, so a change of ``extproc_workers`` needs an Envoy restart too."""
        if len(self._extproc_ports) != max(1, self.extproc_workers):
            more = free_ports(self.extproc_workers - 1) if self.extproc_workers > 1 else []
            self._extproc_ports = (self.ports.extproc, *more)
        return self._extproc_ports

    def start_extproc(self, timeout_s: float = 30.0) -> ManagedProcess:
        p = self.ports
        argv = python_module(
            "extproc",
            "--host",
            p.host,
            "--port",
            ",".join(map(str, self.extproc_ports)),
            "--metrics-port",
            str(p.extproc_metrics),
            "--control-plane",
            f"{p.host}:{p.control_plane}",
            "--workers",
            str(self.extproc_workers),
            *self.extproc_args,
        )
        process = self._spawn("extproc", argv)
        process.wait_until(http_ok(f"http://{p.host}:{p.extproc_metrics}/readyz"), timeout_s)
        return process

    def start_envoy(self, timeout_s: float = 30.0) -> ManagedProcess:
        ports = dataclasses.replace(self.ports.envoy, extproc_more=self.extproc_ports[1:])
        process = envoy_process(self.workdir / "envoy", ports, concurrency=self.envoy_concurrency, xds_api=self.xds_api)
        self.processes["envoy"] = process.start()
        process.wait_until(admin_ready(self.ports.envoy), timeout_s)
        process.wait_until(self._listener_serves, timeout_s)
        return process

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log").start()
        self.processes[name] = process
        return process

    # ------------------------------------------------------------ helpers

    @property
    def state_dir(self) -> Path:
        """Where the control plane persists the spec and live changes (it reads `spec` only when empty)."""
        return self.workdir / "state"

    @property
    def url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.listener}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.admin}"

    @property
    def control_plane_address(self) -> str:
        return f"{self.ports.host}:{self.ports.control_plane}"

    def _listener_serves(self) -> bool:
        return httpx.get(f"{self.url}/v1/models", timeout=1.0).status_code == 200

    def wait_for_completion(self, model: str, timeout_s: float = 30.0) -> httpx.Response:
        """Block until one chat completion for `model` succeeds end to end through Envoy."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                response = httpx.post(
                    f"{self.url}/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4},
                    timeout=5.0,
                )
                if response.status_code == 200:
                    return response
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise StartupError(f"no successful completion for {model} after {timeout_s:.0f}s (last: {last})")


def demo_on_free_ports(directory: Path) -> tuple[Path, Path]:
    """The demo spec and fleet, written into `directory` with every replica on a free port instead of
    the fixed one fleet.yaml gives it, so a second demo runs beside `make run`. Returns (spec, fleet)."""
    fleet = yaml.safe_load(DEMO_FLEET.read_text())
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    replicas = fleet["replicas"]
    moved = {
        r["address"]: f"{r['address'].rsplit(':', 1)[0]}:{port}"
        for r, port in zip(replicas, free_ports(len(replicas)), strict=True)
    }
    for replica in replicas:
        replica["address"] = moved[replica["address"]]
    for model in spec["models"]:
        for version in model["versions"]:
            for endpoint in version["endpoints"]:
                endpoint["address"] = moved[endpoint["address"]]
    directory.mkdir(parents=True, exist_ok=True)
    spec_path, fleet_path = directory / DEMO_SPEC.name, directory / DEMO_FLEET.name
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    fleet_path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return spec_path, fleet_path
