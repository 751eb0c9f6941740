"""The `imesh` CLI in process (click's CliRunner) against a real control plane: options before and
after the subcommand, `get spec`, exit codes, and how `imesh up` picks its ports.

The control plane runs alone, as a separate process on free ports; the spec's endpoints are free
ports nothing listens on, since no request is routed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from controlplane.spec.schema import parse_spec
from imesh.cli import cli
from imesh.commands.up import choose_ports
from imesh.local_mesh import DEMO_FLEET, LocalMesh, demo_on_free_ports
from imesh.ports import MeshPorts, free_ports
from tests.harness import Replica, build_spec

# A port nothing listens on: below 1024, so no test ever binds it.
UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory) -> LocalMesh:
    workdir = tmp_path_factory.mktemp("cli")
    replicas = [Replica("a", "chat", "v1"), Replica("b", "chat", "v2"), Replica("c", "embed", "v1")]
    for replica, port in zip(replicas, free_ports(len(replicas)), strict=True):
        replica.address = f"127.0.0.1:{port}"
    (workdir / "mesh.yaml").write_text(yaml.safe_dump(build_spec(replicas, {"chat": {"v1": 90, "v2": 10}})))
    local = LocalMesh(spec=workdir / "mesh.yaml", workdir=workdir, ports=MeshPorts.ephemeral())
    local.start_control_plane()
    try:
        yield local
    finally:
        local.stop()


def imesh(*args: str, server: str | None = None) -> Result:
    """`imesh ARGS` in process, with $IMESH_SERVER set to `server` (or unset)."""
    return CliRunner(env={"IMESH_SERVER": server}).invoke(cli, list(args))


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def model_names(result: Result) -> set[str]:
    return {row["model"] for row in json.loads(ok(result).stdout)}


# ---------------------------------------------------------------- -o and --server, before and after


def test_output_and_server_work_after_the_subcommand_as_before_it(control_plane):
    address = control_plane.control_plane_address
    before = model_names(imesh("--server", address, "-o", "json", "get", "models"))
    assert before == {"chat", "embed"}
    assert model_names(imesh("get", "models", "-o", "json", "--server", address)) == before
    assert model_names(imesh("get", "-o", "json", "models", "--server", address)) == before
    assert model_names(imesh("get", "models", "--output", "json", server=address)) == before  # $IMESH_SERVER
    assert model_names(imesh("-o", "json", "get", "models", server=address)) == before

    # Nested groups and other commands take them after the subcommand too.
    assert json.loads(ok(imesh("status", "-o", "json", "--server", address)).stdout)["config_version"] >= 1
    assert json.loads(ok(imesh("canary", "status", "chat", "-o", "json", server=address)).stdout) == {"canaries": []}
    described = yaml.safe_load(ok(imesh("describe", "model", "chat", "-o", "yaml", server=address)).stdout)
    assert described["model"] == "chat" and {v["version"] for v in described["versions"]} == {"v1", "v2"}
    routes = json.loads(ok(imesh("get", "routes", "--server", address, "-o", "json")).stdout)
    assert {"chat", "embed"} <= {r["route"] for r in routes}


def test_the_option_after_the_subcommand_wins(control_plane):
    address = control_plane.control_plane_address
    assert model_names(imesh("-o", "yaml", "get", "models", "-o", "json", server=address)) == {"chat", "embed"}
    assert model_names(imesh("--server", UNREACHABLE, "-o", "json", "get", "models", "--server", address))
    assert model_names(imesh("-o", "json", "get", "models", "--server", address, server=UNREACHABLE))

    unreachable = imesh("--server", address, "get", "models", "--server", UNREACHABLE)
    assert unreachable.exit_code == 1 and f"cannot reach the control plane at {UNREACHABLE}" in unreachable.stderr
    table = ok(imesh("-o", "json", "get", "models", "-o", "table", server=address)).stdout
    assert table.splitlines()[0].split()[0] == "MODEL"


# ---------------------------------------------------------------- get spec


def test_get_spec_prints_the_applied_spec_and_its_config_version(control_plane, tmp_path):
    address = control_plane.control_plane_address
    spec = yaml.safe_load(ok(imesh("get", "spec", server=address)).stdout)
    spec["models"][0]["versions"][0]["weight"] = 70
    spec["models"][0]["versions"][1]["weight"] = 30
    applied = tmp_path / "applied.yaml"
    applied.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = json.loads(ok(imesh("apply", "-f", str(applied), "-o", "json", server=address)).stdout)
    assert result["changed"]
    version = result["config_version"]

    printed = ok(imesh("get", "spec", server=address))
    assert parse_spec(printed.stdout) == parse_spec(applied.read_text())
    assert printed.stderr == f"config version {version}\n"  # stdout is the spec alone: it can be applied as is

    for output, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        document = load(ok(imesh("get", "spec", "-o", output, server=address)).stdout)
        assert document["config_version"] == version
        assert parse_spec(yaml.safe_dump(document["spec"])) == parse_spec(applied.read_text())

    again = tmp_path / "printed.yaml"
    again.write_text(printed.stdout)
    assert ok(imesh("apply", "-f", str(again), server=address)).stdout.strip() == "no changes"


# ---------------------------------------------------------------- exit codes


def test_errors_from_the_mesh_exit_1_with_the_message_on_stderr(control_plane, tmp_path):
    address = control_plane.control_plane_address
    unreachable = imesh("get", "spec", "--server", UNREACHABLE)
    assert unreachable.exit_code == 1 and unreachable.stdout == ""
    assert unreachable.stderr.startswith(f"error: cannot reach the control plane at {UNREACHABLE}")

    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"models": [{"name": "x", "wieght": 1}]}))
    refused = imesh("apply", "-f", str(typo), server=address)
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: ") and "models[0].wieght: unknown field" in refused.stderr
    unknown = imesh("canary", "set", "nope", "v2", "5", server=address)
    assert unknown.exit_code == 1 and "unknown model 'nope'" in unknown.stderr
    missing = imesh("describe", "model", "nope", server=address)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: unknown model 'nope'")


@pytest.mark.parametrize(
    "args",
    [
        ("get", "nope"),
        ("get",),
        ("get", "models", "-o", "xml"),
        ("-o", "xml", "get", "models"),
        ("get", "models", "--server"),
        ("frobnicate",),
        ("up",),  # neither -f nor --demo
        ("up", "--demo", "--ports", "random"),
        ("canary", "set", "chat", "v2", "120"),
    ],
)
def test_usage_errors_exit_2(args):
    result = imesh(*args, server=UNREACHABLE)  # none of them reaches the control plane
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Error: " in result.stderr and not result.stdout


def test_help_lists_get_spec_and_the_options_after_the_subcommand():
    root = ok(imesh("--help")).stdout
    assert "--server" in root and "after" in root
    get = ok(imesh("get", "--help")).stdout
    assert "spec" in get and "-o, --output [table|json|yaml]" in get and "--server" in get
    up = ok(imesh("up", "--help")).stdout
    assert "--ports [default|ephemeral]" in up
    for option in ("listener", "admin", "control-plane", "control-plane-metrics", "extproc", "extproc-metrics"):
        assert f"--{option}-port INTEGER" in up


# ---------------------------------------------------------------- imesh up's ports


def test_up_ports_are_the_defaults_unless_given():
    assert choose_ports(False, {}) == MeshPorts()
    chosen = choose_ports(False, {"listener_port": 8181, "admin_port": None})
    assert chosen == MeshPorts(listener=8181)


def test_up_ports_ephemeral_are_free_and_distinct_and_keep_those_given():
    (listener,) = free_ports(1)
    ports = choose_ports(True, {"listener_port": listener, "admin_port": None})
    numbers = [getattr(ports, name) for name in MeshPorts.port_names()]
    assert ports.listener == listener and len(set(numbers)) == len(numbers)
    defaults = MeshPorts()
    assert not {getattr(defaults, name) for name in MeshPorts.port_names()} & set(numbers)


def test_the_demo_on_free_ports_moves_every_replica_in_spec_and_fleet_alike(tmp_path):
    spec_path, fleet_path = demo_on_free_ports(tmp_path)
    fleet = {r["address"] for r in yaml.safe_load(fleet_path.read_text())["replicas"]}
    spec = parse_spec(spec_path.read_text(), str(spec_path))
    served = {e.address for m in spec.models for v in m.versions for e in v.endpoints}
    assert served == fleet and len(fleet) == len(_demo_addresses())
    assert not fleet & _demo_addresses()


def _demo_addresses() -> set[str]:
    return {r["address"] for r in yaml.safe_load(Path(DEMO_FLEET).read_text())["replicas"]}
