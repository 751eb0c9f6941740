"""A readable diff between two specs, keyed by names rather than list positions.

`models.llama-3-8b.versions.v2.weight: 10 -> 25` says what an operator needs to check before
applying; a positional YAML diff would not survive a reordered list.
"""

from __future__ import annotations

from controlplane.spec.schema import MeshSpec

_KEYS = ("name", "address")


def diff_specs(old: MeshSpec, new: MeshSpec) -> list[str]:
    lines: list[str] = []
    _diff(_keyed(old.model_dump(mode="json")), _keyed(new.model_dump(mode="json")), "", lines)
    return lines


def _keyed(value):
    """Lists of named items become dicts keyed by name (or address), recursively."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        key = next((k for k in _KEYS if all(k in v for v in value)), None)
        if key is not None:
            return {v[key]: _keyed({k: x for k, x in v.items() if k != key}) for v in value}
    if isinstance(value, dict):
        return {k: _keyed(v) for k, v in value.items()}
    return value


def _diff(old, new, path: str, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            child = f"{path}.{key}" if path else str(key)
            if key not in new:
                lines.append(f"- {child}")
            elif key not in old:
                lines.append(f"+ {child}")
            else:
                _diff(old[key], new[key], child, lines)
    elif old != new:
        lines.append(f"~ {path}: {_short(old)} -> {_short(new)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
