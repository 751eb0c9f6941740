"""The fleet's YAML configuration, validated with pydantic.

A config error must say which file and which field are wrong, because a fleet config is
hand-written and read by a subprocess whose traceback nobody sees: ``FleetConfig.load``
raises ``FleetConfigError("fleet.yaml: replicas[2].gpu: unknown GPU profile 'h200' ...")``.

Example::

    seed: 7
    time_scale: 1.0
    replicas:
      - name: llama-h100-a
        address: 127.0.0.1:19000
        models: [llama-3-8b]
        version: v1            # optional: the KServe v2 model version this replica serves
        gpu: h100
        overrides: {max_num_seqs: 8, kv_capacity_tokens: 20000}
      - name: llama-h100-b
        address: 127.0.0.1:19001
        models: [llama-3-8b]
        adapters: [sql-lora]   # LoRA adapters of the first model, requested by name as the `model`
        overrides: {max_loras: 2, adapter_load_s: 0.5}
        kv_events: tcp://127.0.0.1:5557   # publish vLLM's KV-cache events here (fleet/kv_publisher.py)
        tokenizer: /models/llama/tokenizer.json  # tokenize with this HF tokenizer (fleet/tokenizer.py)

A port of 0 asks the OS for a free port (the running fleet reports the one it got), for the
HTTP address and the KV events endpoint alike.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleet.profiles import OVERRIDABLE, PROFILES, GpuProfile, get_profile


class FleetConfigError(ValueError):
    """A fleet config that cannot be used; the message names the file and the field."""


class ReplicaConfig(BaseModel):
    """One simulated replica: where it listens, what it serves and on which GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    address: str = Field(description="host:port to listen on (loopback only)")
    models: list[str] = Field(min_length=1)
    version: str | None = Field(None, description="KServe v2 version served; None accepts any")
    gpu: str = "h100"
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters of the first model this replica can serve (fleet/lora.py)"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    kv_events: str | None = Field(None, description="tcp://host:port to publish vLLM's KV events on (loopback)")
    tokenizer: str | None = Field(None, description="an HF tokenizer.json to tokenize prompts with")

    @field_validator("kv_events")
    @classmethod
    def _check_kv_events(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, sep, rest = v.partition("://")
        if scheme != "tcp" or not sep:
            raise ValueError(f"expected tcp://host:port, got {v!r}")
        _check_loopback(rest)
        return v

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        _check_loopback(v)
        return v

    @field_validator("models")
    @classmethod
    def _check_models(cls, v: list[str]) -> list[str]:
        if any(not m for m in v):
            raise ValueError("model names must not be empty")
        if len(set(v)) != len(v):
            raise ValueError("model names must be unique")
        return v

    @model_validator(mode="after")
    def _check_adapters(self) -> ReplicaConfig:
        if any(not a for a in self.adapters):
            raise ValueError("adapters: names must not be empty")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError("adapters: names must be unique")
        clash = sorted(set(self.adapters) & set(self.models))
        if clash:
            raise ValueError(f"adapters: {clash} are also model names")
        return self

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, v: str) -> str:
        if v not in PROFILES:
            raise ValueError(f"unknown GPU profile {v!r}; known: {', '.join(sorted(PROFILES))}")
        return v

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(OVERRIDABLE)}")
        for key, val in v.items():
            if key == "device_name":
                if not isinstance(val, str):
                    raise ValueError("device_name must be a string")
            elif key in _BOOLS:
                if not isinstance(val, bool):
                    raise ValueError(f"{key} must be true or false, got {val!r}")
            elif isinstance(val, bool) or not isinstance(val, int | float) or val < 0:
                raise ValueError(f"{key} must be a non-negative number, got {val!r}")
            elif key in _POSITIVE_INTS and (not float(val).is_integer() or val < 1):
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        return {k: (int(x) if k in _POSITIVE_INTS else x) for k, x in v.items()}

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def profile(self) -> GpuProfile:
        """The GPU profile with this replica's overrides applied."""
        return get_profile(self.gpu).with_overrides(self.overrides)


def _check_loopback(v: str) -> None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {v!r}")
    if host != "localhost":
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"host must be an IP address or localhost, got {host!r}") from None
        if not ip.is_loopback:
            raise ValueError(f"the simulated fleet listens on loopback only, got {host!r}")


_POSITIVE_INTS = frozenset(
    {
        "max_num_seqs",
        "kv_capacity_tokens",
        "max_model_len",
        "block_size",
        "prefix_cache_blocks",
        "memory_total_mib",
        "weights_mib",
        "max_loras",
        "max_num_batched_tokens",
    }
)
_BOOLS = frozenset({"enable_chunked_prefill", "optimistic_admission"})


class FleetConfig(BaseModel):
    """A whole fleet: a seed for reproducibility, a time scale and the replicas."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    time_scale: float = Field(1.0, gt=0.0, description="multiplies every simulated duration")
    replicas: list[ReplicaConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_unique(self) -> FleetConfig:
        names: set[str] = set()
        addrs: set[tuple[str, int]] = set()
        for r in self.replicas:
            if r.name in names:
                raise ValueError(f"duplicate replica name {r.name!r}")
            names.add(r.name)
            if r.port and (r.host, r.port) in addrs:
                raise ValueError(f"duplicate replica address {r.address!r}")
            addrs.add((r.host, r.port))
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "<fleet config>") -> FleetConfig:
        """Validate a parsed document; errors are prefixed with ``source``."""
        if not isinstance(data, dict):
            raise FleetConfigError(f"{source}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise FleetConfigError(_describe(source, exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> FleetConfig:
        """Read and validate a fleet YAML file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise FleetConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FleetConfigError(f"{path}: invalid YAML: {exc}") from None
        return cls.from_dict(data, str(path))

    def replica(self, name: str) -> ReplicaConfig:
        for r in self.replicas:
            if r.name == name:
                return r
        raise KeyError(name)


def _describe(source: str, exc: ValidationError) -> str:
    """Turn pydantic errors into ``file: replicas[2].gpu: message`` lines."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc or '(top level)'}: {msg}")
    return "\n".join(lines)
