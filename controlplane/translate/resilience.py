"""The spec's `resilience:` as Envoy config: active health checks, outlier detection, retries.

Envoy does the work; this module only sizes it for GPU replicas (controlplane/spec/resilience.py
has the defaults and why). What each piece guards against:

- active health checks: a replica that is up but not ready (loading weights, out of memory) stops
  getting requests, the picker's pick included (``override_host`` skips unhealthy hosts);
- outlier detection: a replica that answers 5xx or fails connections is ejected for a while;
- retries: only where the client has seen nothing yet, on another replica, within a budget, and
  a per-try bound for a replica that never starts answering.
"""

from __future__ import annotations

import functools

from envoy.config.cluster.v3 import circuit_breaker_pb2, outlier_detection_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from controlplane.spec.resilience import HealthCheckSpec, OutlierDetectionSpec, RetrySpec
from controlplane.translate.protobuf import pack, seconds

# Connect failures, refused streams, resets (a replica that died with the request queued or in
# prefill: its work is lost anyway), and the statuses the spec names. Envoy retries only while
# nothing of the response has gone downstream, so a stream that has begun is never replayed.
_RETRY_ON = "connect-failure,refused-stream,reset"
# A retry goes to a host not tried before: the pick list's next one, else Envoy's balancer, whose
# choice the previous-hosts predicate rejects and redraws up to this many times. Least-request
# favours the failing replica (it answers fast, so it looks idle): 5 redraws among 3 replicas
# still landed on it again in ~1 of 8 retries; 20 make that ~1 in 3,000.
_HOST_SELECTION_ATTEMPTS = 20


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


@functools.lru_cache(maxsize=1024)
def health_check(spec: HealthCheckSpec, path: str) -> health_check_pb2.HealthCheck | None:
    """One active check of a cluster's replicas: HTTP GET `path` (2xx is ready), or TCP without one."""
    if not spec.enabled:
        return None
    check = health_check_pb2.HealthCheck(
        timeout=seconds(spec.timeout_s),
        interval=seconds(spec.interval_s),
        # A version nobody calls is still checked at the same pace: a canary at 0% must be ready
        # before its first request, not a minute after (Envoy's default no-traffic interval is 60 s).
        no_traffic_interval=seconds(spec.interval_s),
        unhealthy_threshold=_u32(spec.unhealthy_threshold),
        healthy_threshold=_u32(spec.healthy_threshold),
        # New replicas are checked at once rather than at the next interval.
        initial_jitter=seconds(0),
    )
    if path:
        check.http_health_check.path = path
    else:
        check.tcp_health_check.SetInParent()
    return check


def outlier_detection(spec: OutlierDetectionSpec) -> outlier_detection_pb2.OutlierDetection:
    never = 1_000_000  # Envoy has no "off" for the consecutive counters: a count no replica reaches
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=_u32(spec.consecutive_5xx or never),
        enforcing_consecutive_5xx=_u32(100 if spec.consecutive_5xx else 0),
        consecutive_gateway_failure=_u32(spec.consecutive_gateway_failure or never),
        enforcing_consecutive_gateway_failure=_u32(100 if spec.consecutive_gateway_failure else 0),
        interval=seconds(spec.interval_s),
        base_ejection_time=seconds(spec.base_ejection_s),
        max_ejection_percent=_u32(spec.max_ejection_percent),
        success_rate_minimum_hosts=_u32(spec.success_rate_min_hosts or never),
        enforcing_success_rate=_u32(100 if spec.success_rate_min_hosts else 0),
        # A replica answering 500s to every request may still say 200 on /health: passing the
        # active check must not cut its ejection short (Envoy's default would, at the next check).
        successful_active_health_check_uneject_host=wrappers_pb2.BoolValue(value=False),
    )


def retry_budget(spec: RetrySpec) -> circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget:
    return circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
        budget_percent=percent_pb2.Percent(value=spec.budget_percent),
        min_retry_concurrency=_u32(spec.min_retry_concurrency),
    )


def retry_policy(spec: RetrySpec, max_retries: int) -> route_components_pb2.RetryPolicy:
    retry_on = _RETRY_ON + (",retriable-status-codes" if spec.retriable_status_codes else "")
    if spec.per_try_timeout_s:
        retry_on += ",gateway-error"  # what a per-try timeout counts as (a 504); 502/503 are gateway errors too
    policy = route_components_pb2.RetryPolicy(
        retry_on=retry_on,
        num_retries=_u32(max_retries),
        retriable_status_codes=list(spec.retriable_status_codes),
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=_HOST_SELECTION_ATTEMPTS,
    )
    if spec.per_try_timeout_s:
        policy.per_try_timeout.CopyFrom(seconds(spec.per_try_timeout_s))
    if spec.per_try_idle_timeout_s:
        policy.per_try_idle_timeout.CopyFrom(seconds(spec.per_try_idle_timeout_s))
    return policy
