"""Build hygiene: generated gRPC code matches protos/, and Envoy accepts the rendered bootstrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from imesh.envoy_process import EnvoyPorts, render_bootstrap, validate_bootstrap

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
