"""The control plane's passive ejection of replicas that keep failing the picker's requests."""

from __future__ import annotations

from controlplane.load.ejection import Ejections
from controlplane.spec.resilience import OutlierDetectionSpec
from controlplane.traffic.record import RequestRecord

A, B, C, D = (f"127.0.0.1:{p}" for p in (9001, 9002, 9003, 9004))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def record(endpoint: str, status: int = 200, attempts: int = 1, picked: tuple[str, ...] = (), **kw) -> RequestRecord:
    return RequestRecord(
        model="chat",
        version="v1",
        endpoint=endpoint,
        pool="p",
        priority="standard",
        status=status,
        duration_s=0.1,
        ttft_s=None,
        upstream_failure=kw.pop("upstream_failure", False),
        shed=False,
        request_bytes=0,
        response_bytes=0,
        attempts=attempts,
        picked=picked,
    )


def tracker(**spec) -> tuple[Ejections, list[tuple[str, float]], Clock]:
    told: list[tuple[str, float]] = []
    clock = Clock()
    ejections = Ejections(lambda address, until: told.append((address, until)), clock=clock)
    rules = {"consecutive_5xx": 3, "consecutive_gateway_failure": 2, "base_ejection_s": 10, **spec}
    ejections.configure(OutlierDetectionSpec(**rules), {"chat/v1": [A, B, C, D]})
    return ejections, told, clock


def test_consecutive_5xx_eject_and_a_success_resets_the_count():
    ejections, told, clock = tracker()
    for status in (500, 500, 200, 500, 500):
        ejections(record(A, status))
    assert told == [] and not ejections.ejected(A)
    ejections(record(A, 503))
    assert told == [(A, 110.0)] and ejections.ejected(A)
    clock.now = 110.0
    assert not ejections.ejected(A)
    for _ in range(3):
        ejections(record(A, 500))
    assert told[-1] == (A, 130.0)  # the second ejection lasts twice as long


def test_retried_tries_count_against_the_replicas_they_left():
    ejections, told, _ = tracker()
    # Two tries: the first (on A, the pick's head) failed, B answered.
    ejections(record(B, 200, attempts=2, picked=(A, B, C)))
    assert told == []
    ejections(record(C, 200, attempts=2, picked=(A, C)))
    assert told == [(A, 110.0)]  # consecutive_gateway_failure 2
    assert record(B, 200, attempts=1, picked=(A, B)).failed_tries() == ()
    assert record(A, 200, attempts=3, picked=(A, B)).failed_tries() == (B,)  # the answering one is not counted


def test_connect_failures_and_no_answer_are_gateway_failures():
    ejections, told, _ = tracker()
    ejections(record(A, 503, upstream_failure=True))
    ejections(record(A, 0))
    assert told == [(A, 110.0)]


def test_never_more_than_max_ejection_percent_of_a_version():
    ejections, told, _ = tracker(max_ejection_percent=50)
    for address in (A, B, C):
        for _ in range(3):
            ejections(record(address, 500))
    assert [address for address, _ in told] == [A, B]  # 2 of 4 out: C stays in


def test_a_zero_threshold_never_ejects_and_unknown_replicas_are_ignored():
    ejections, told, _ = tracker(consecutive_5xx=0)
    for _ in range(10):
        ejections(record(A, 500))
        ejections(record("10.0.0.1:1", 500))
    assert told == []
