"""Fault injection settings for one replica, set at runtime through ``POST /sim/faults``.

Tests use these to make a replica look broken, slow or loaded without killing it, so that
they can assert how the mesh reacts (retries, outlier ejection, load-aware picking).
Stall times are wall-clock seconds: they are not multiplied by the fleet's ``time_scale``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Faults(BaseModel):
    """The active faults of a replica; the defaults mean "healthy"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fraction of inference requests that fail")
    error_status: int = Field(default=500, ge=400, le=599, description="HTTP status of an injected failure")
    stall_s: float = Field(default=0.0, ge=0.0, le=3600.0, description="wall seconds to wait before handling")
    slowdown: float = Field(default=1.0, gt=0.0, le=1000.0, description="multiplier on every engine step time")
    extra_waiting: int = Field(default=0, ge=0, le=1_000_000, description="fake queued requests shown in metrics")
    not_ready: bool = Field(default=False, description="readiness endpoints answer 503 (liveness stays 200)")
    crash_after_tokens: int = Field(
        default=0,
        ge=0,
        description="a stream's connection is dropped after this many tokens, as a crash would; 0 = never",
    )

    def merged(self, update: dict[str, Any]) -> Faults:
        """Validate a partial update on top of these faults (raises ``pydantic.ValidationError``)."""
        return Faults.model_validate({**self.model_dump(), **update})
