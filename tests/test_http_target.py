"""HttpTarget's retries, against a mocked service (no server): the same rules as the soak's clean clients."""

from __future__ import annotations

import httpx
import pytest
import torch

from attacker_sim.http_target import BATCH_ID_PREFIX, HttpTarget, TargetError
from service.deployment.codec import InputSpec, decode_safetensors_batch

SPEC = InputSpec((1, 8, 8), num_classes=10, max_samples=64)


def _step_against(service, timeout_seconds: float = 120.0):
    """One `HttpTarget.step` of 4 digits against the mocked `service` (a function of the request)."""
    target = HttpTarget("http://127.0.0.1:9", api_key="key", timeout_seconds=timeout_seconds)
    target.client = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(service))
    try:
        return target.step(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    finally:
        target.close()


def test_step_retries_503_429_and_a_refused_connection_with_the_same_batch_id():
    answers = iter(["refused", 503, 429, 202])
    posted: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posted.append(decode_safetensors_batch(request.content, SPEC).batch_id)
            answer = next(answers)
            if answer == "refused":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(answer, headers={"Retry-After": "0"}, json={"batch_id": posted[-1]})
        record = {"samples": 4, "flagged": 4, "corrected": 0, "threshold": 0.5, "step_seconds": 0.01}
        return httpx.Response(200, json={"state": "applied", "record": record})

    outcome = _step_against(service)
    assert len(posted) == 4 and len(set(posted)) == 1 and posted[0].startswith(BATCH_ID_PREFIX)
    assert (outcome.samples, outcome.flagged) == (4, 4)


def test_a_wait_for_the_batch_that_times_out_is_asked_again_until_the_deadline():
    waits: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"batch_id": decode_safetensors_batch(request.content, SPEC).batch_id})
        waits.append(request.url.path)
        if len(waits) == 1:  # an API too busy to answer in time (a large model being rebuilt)
            raise httpx.ReadTimeout("timed out", request=request)
        record = {"samples": 4, "flagged": 0, "corrected": 0, "threshold": 0.5, "step_seconds": 0.01}
        return httpx.Response(200, json={"state": "applied", "record": record})

    outcome = _step_against(service)
    assert len(waits) == 2 and waits[0] == waits[1] and outcome.samples == 4

    def never_answers(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"batch_id": "b"})
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(TargetError, match="batch state: ReadTimeout"):
        _step_against(never_answers, timeout_seconds=0.2)


@pytest.mark.parametrize("answer, message", [(429, "ingest.*429"), (503, "ingest.*503"),
                                             ("refused", "ingest: ConnectError")])
def test_a_service_that_keeps_refusing_is_given_up_at_the_deadline_with_what_it_said(answer, message):
    """Retry-After is honoured only up to the deadline: a 1-hour Retry-After does not hold the client an hour."""
    posts: list[bool] = []

    def service(request: httpx.Request) -> httpx.Response:
        posts.append(request.method == "POST")
        if answer == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(answer, headers={"Retry-After": "3600"}, json={"detail": "busy"})

    with pytest.raises(TargetError, match=message):
        _step_against(service, timeout_seconds=0.3)
    assert all(posts) and len(posts) >= 2  # retried, and only the ingest was asked
