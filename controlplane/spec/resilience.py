"""The spec's `resilience:` section: health checks, outlier detection and retries of model clusters.

Envoy's own machinery does the work (controlplane/translate/resilience.py turns this into cluster
and route config); the defaults are sized for GPU replicas: a request may take minutes, a replica
serves dozens at once, so one slow answer is not a failure and one failure is not a dead host.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protos.defaults import Engine

# Each engine's readiness route. Per model where the engine has one (KServe v2), so a server that
# is up but has not loaded this model is not ready for it. "generic" has none: TCP, or `path`.
READINESS_PATHS: dict[str, str] = {
    "vllm": "/health",
    "sglang": "/health",
    "triton": "/v2/models/{model}/ready",
    "trtllm": "/v2/models/{model}/ready",
}


def readiness_path(engine: Engine | str, model: str, override: str = "") -> str:
    """The HTTP path that says whether a replica of `model` is ready; "" means a TCP check only."""
    path = override or READINESS_PATHS.get(engine, "")
    return path.replace("{model}", model)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheckSpec(_Section):
    enabled: bool = True
    interval_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=2.0, gt=0, le=600)
    unhealthy_threshold: int = Field(default=2, ge=1, le=100, description="failed checks before a replica is out")
    healthy_threshold: int = Field(default=1, ge=1, le=100, description="passed checks before it is back")
    path: str = Field(
        default="",
        description="readiness path for every engine ('{model}' is replaced); '' = the engine's own "
        "(vLLM/SGLang /health, Triton/TRT-LLM /v2/models/{model}/ready), TCP for generic",
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/', got {value!r}")
        return value

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthCheckSpec:
        if self.timeout_s > self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) must not exceed interval_s ({self.interval_s:g})")
        return self


class OutlierDetectionSpec(_Section):
    consecutive_5xx: int = Field(default=5, ge=0, description="5xx in a row that eject a replica; 0 = never")
    consecutive_gateway_failure: int = Field(
        default=3, ge=0, description="connect failures, resets and 502-504 in a row that eject; 0 = never"
    )
    interval_s: float = Field(default=1.0, gt=0)
    base_ejection_s: float = Field(default=10.0, gt=0, description="first ejection; each further one lasts longer")
    max_ejection_percent: int = Field(default=50, ge=0, le=100, description="never eject more of a version's replicas")
    success_rate_min_hosts: int = Field(
        default=5,
        ge=0,
        description="success-rate ejection (outliers against their peers) from this many replicas; 0 = off",
    )


class RetrySpec(_Section):
    retriable_status_codes: tuple[int, ...] = Field(
        default=(503,),
        description="upstream statuses retried on another replica, before any of the response reached the client",
    )
    budget_percent: float = Field(
        default=20.0, ge=0, le=100, description="retries in flight at most this share of a version's active requests"
    )
    # Envoy's default is 3; a GPU replica that dies fails dozens of requests at once, all worth a retry.
    min_retry_concurrency: int = Field(default=10, ge=0, description="retries always allowed, whatever the budget")
    per_try_timeout_s: float = Field(
        default=30.0, ge=0, description="a try without response headers this long moves to another replica; 0 = none"
    )
    per_try_idle_timeout_s: float = Field(
        default=60.0, ge=0, description="a try that sends nothing this long is reset, mid-stream too; 0 = none"
    )

    @field_validator("retriable_status_codes")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in value if not 500 <= s <= 599]
        if bad:
            raise ValueError(f"only 5xx statuses are retried, got {bad}")
        return tuple(sorted(set(value)))


class ResilienceSpec(_Section):
    health_checks: HealthCheckSpec = HealthCheckSpec()
    outlier_detection: OutlierDetectionSpec = OutlierDetectionSpec()
    retries: RetrySpec = RetrySpec()
