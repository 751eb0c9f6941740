"""Build hygiene: generated gRPC code matches protos/, and Envoy accepts the rendered bootstrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from imesh.envoy_process import render_bootstrap, validate_bootstrap
from imesh.ports import EnvoyPorts

REPO = Path(__file__).resolve().parent.parent


def test_generated_protos_are_up_to_date(tmp_path):
    protos = sorted(p.relative_to(REPO) for p in (REPO / "protos").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
        cwd=REPO,
    )
    generated = sorted(tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for fresh in generated:
        committed = REPO / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is out of date: run `make protos`"


def test_rendered_bootstrap_passes_envoy_validate(tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(render_bootstrap(EnvoyPorts(admin=19901, xds=28000, extproc=28001)))
    result = validate_bootstrap(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_bootstrap_static_clusters_are_the_wire_contracts():
    """envoy/bootstrap.yaml is YAML and spells the static cluster names itself: they must be the
    ones the control plane's snapshots and the ext_proc filter refer to (protos/wire.py)."""
    from protos import wire

    bootstrap = yaml.safe_load(render_bootstrap(EnvoyPorts(admin=19901, xds=28000, extproc=28001)))
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert set(clusters) == set(wire.BOOTSTRAP_CLUSTERS) == {"imesh_xds", "imesh_extproc"}
    assert all(c["load_assignment"]["cluster_name"] == name for name, c in clusters.items())
    ads = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    assert [s["envoy_grpc"]["cluster_name"] for s in ads] == [wire.XDS_CLUSTER]


def test_the_extproc_cluster_holds_thousands_of_concurrent_streams():
    """Each request in flight holds an ext_proc stream; Envoy's default breaker (1,024) would fail
    the 1,025th open, and a body-named model would then be unreadable."""
    bootstrap = yaml.safe_load(render_bootstrap(EnvoyPorts(admin=19901, xds=28000, extproc=28001)))
    (extproc,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "imesh_extproc"]
    (thresholds,) = extproc["circuit_breakers"]["thresholds"]
    assert min(thresholds[k] for k in ("max_connections", "max_pending_requests", "max_requests")) >= 100_000
