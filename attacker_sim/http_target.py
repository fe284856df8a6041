"""The running service as a campaign target: the same campaigns as in-process, end to end over HTTP.

`step` POSTs the batch (safetensors, a fresh batch_id) to /v1/ingest and waits, bounded, until the
worker has applied it, then reads what the defense did from the batch's audit record. `predict`
asks /v1/predict; `white_box_model` downloads /v1/model with the admin token (a black-box attacker
uses its own surrogate instead and never calls it).

`reset` (admin token) asks the service to rebuild its learner from the starting state of a seed, in stream order,
and waits until the worker has done it. `reset_targets` turns one service per strategy into the targets of
`attacker_sim.evaluation.evaluate`: each run starts from a reset, so the table is `dscguard eval`'s, measured
through the real stack (`dscguard attack --targets`, the compose eval profile); `attacker_sim.agreement` says
whether its `results.json` and the in-process one agree within a tolerance.

`evaluate_target` runs the scenarios of `dscguard eval` against one running service (or any target) without
resetting it (`dscguard attack --target`): each scenario starts where the previous one left the model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

import httpx
import numpy as np
import torch
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_result
from torch import nn

from attacker_sim.targets import StepOutcome, Target
from service.core.config import ExperimentConfig
from service.deployment.codec import encode_safetensors_batch
from service.deployment.model_store import model_from_bytes

SAFETENSORS = "application/vnd.safetensors"
BATCH_ID_PREFIX = "attack-"  # every batch the attacker submits: its id is this and a fresh uuid


class TargetError(RuntimeError):
    """The service refused a request or did not apply a batch in time."""


class HttpTarget:
    """A `Target` backed by a running dscguard service at `url`.

    >>> target = HttpTarget("http://127.0.0.1:9", api_key="key")  # nothing is contacted until used
    >>> target.close()
    """

    def __init__(self, url: str, api_key: str, admin_token: str | None = None, *, timeout_seconds: float = 120.0,
                 predict_chunk: int = 512):
        self.admin_token = admin_token
        self.timeout_seconds, self.predict_chunk = timeout_seconds, predict_chunk
        self.client = httpx.Client(base_url=url.rstrip("/"), headers={"X-API-Key": api_key},
                                   timeout=httpx.Timeout(30.0, connect=5.0))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutcome:
        """Submit one batch for learning and wait until the worker has applied it.

        Until the timeout, a 429 (queue full) or 503 (Redis away) is retried after its Retry-After and a
        failed connection (the API restarting) after 0.5 s, always with the same batch_id: a retry of a
        batch that got in is answered 200 as a duplicate and applied once. A wait for the batch's state that
        fails in transport (an API too busy to answer in time, rebuilding a large model) is asked again.
        """
        batch_id = f"{BATCH_ID_PREFIX}{uuid.uuid4().hex}"
        body = encode_safetensors_batch(x, y, batch_id=batch_id)
        deadline = time.monotonic() + self.timeout_seconds
        response = self._post_retrying("/v1/ingest", deadline, "ingest", content=body,
                                       headers={"Content-Type": SAFETENSORS})
        _check(response, "ingest")
        state = self._wait_applied(batch_id, deadline)
        record = state["record"]
        discrepancy = state.get("discrepancy")
        return StepOutcome(samples=record["samples"], flagged=record["flagged"], corrected=record["corrected"],
                           threshold=record["threshold"], seconds=record["step_seconds"],
                           discrepancy=np.asarray(discrepancy, dtype=np.float32) if discrepancy is not None else None)

    def _post_retrying(self, path: str, deadline: float, what: str, **request) -> httpx.Response:
        """POST until the answer is neither 429 (queue full) nor 503 (Redis away), waiting its Retry-After, or a
        failed connection (the API restarting), waiting 0.5 s; at `deadline` the last answer is returned, or a
        failed connection is a `TargetError`. Waits never run past the deadline."""

        def wait(state: RetryCallState) -> float:
            remaining = max(0.0, deadline - time.monotonic())
            if state.outcome.failed:
                return min(0.5, remaining)
            return min(float(state.outcome.result().headers.get("Retry-After", 1)), remaining)

        def give_up(state: RetryCallState) -> httpx.Response:
            try:
                return state.outcome.result()
            except httpx.TransportError as exc:
                raise TargetError(f"{what}: {type(exc).__name__}: {exc}") from exc

        retrying = Retrying(retry=retry_if_exception_type(httpx.TransportError)
                            | retry_if_result(lambda response: response.status_code in (429, 503)),
                            wait=wait, stop=lambda state: time.monotonic() >= deadline, retry_error_callback=give_up)
        return retrying(self.client.post, path, **request)

    def _wait_applied(self, batch_id: str, deadline: float) -> dict:
        while True:  # the service holds each request until the batch leaves the queue (or 10 s pass)
            wait = min(10.0, max(0.0, deadline - time.monotonic()))
            try:
                response = self.client.get(f"/v1/batches/{batch_id}", params={"wait": wait})
            except httpx.TransportError as exc:  # an API slow to answer (a large model being rebuilt) or restarting
                if time.monotonic() >= deadline:
                    raise TargetError(f"batch state: {type(exc).__name__}: {exc}") from exc
                time.sleep(0.5)
                continue
            _check(response, "batch state")
            state = response.json()
            if state["state"] == "applied":
                return state
            if state["state"] in ("dead_letter", "skipped"):
                raise TargetError(f"batch {batch_id} was not applied ({state['state']}): {state.get('reason')}")
            if time.monotonic() >= deadline:
                raise TargetError(f"batch {batch_id} was not applied within {self.timeout_seconds} s "
                                  "(is the worker running?)")

    def reset(self, seed: int) -> dict:
        """Reset the service's learner to `seed`'s starting state and wait until the worker has (admin token); the
        reset's audit record (seed, strategy, model version, calibration). Retried like `step`."""
        if self.admin_token is None:
            raise TargetError("a reset needs the admin token (DSCGUARD_ADMIN_TOKEN)")
        reset_id = f"reset-{uuid.uuid4().hex}"
        deadline = time.monotonic() + self.timeout_seconds
        response = self._post_retrying("/v1/admin/reset", deadline, "reset", json={"seed": seed, "reset_id": reset_id},
                                       headers={"X-API-Key": self.admin_token})
        _check(response, "reset")
        return self._wait_applied(reset_id, deadline)["record"]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        labels = []
        for start in range(0, len(x), self.predict_chunk):
            body = encode_safetensors_batch(x[start : start + self.predict_chunk])
            response = self.client.post("/v1/predict", content=body, headers={"Content-Type": SAFETENSORS})
            _check(response, "predict")
            labels += response.json()["labels"]
        return torch.tensor(labels, dtype=torch.long)

    def white_box_model(self) -> nn.Module:
        if self.admin_token is None:
            raise TargetError("a white-box attack needs the admin token (/v1/model)")
        response = self.client.get("/v1/model", headers={"X-API-Key": self.admin_token})
        _check(response, "model")
        return model_from_bytes(response.content).model

    def status(self) -> dict:
        response = self.client.get("/v1/status", params={"audit": 0})
        _check(response, "status")
        return response.json()

    def close(self) -> None:
        self.client.close()


def _check(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    raise TargetError(f"{what}: HTTP {response.status_code}: {detail}")


def reset_targets(endpoints: Mapping[str, HttpTarget]):
    """The targets of `evaluate` from one running service per strategy (`endpoints`: strategy -> its service): each
    run resets that service to the seed's starting state first. A service that serves another strategy than the
    one it stands for is refused."""
    def target(experiment, strategy):
        endpoint = endpoints.get(strategy.name)
        if endpoint is None:
            raise TargetError(f"no service for strategy {strategy.name!r} (given: {', '.join(endpoints)})")
        record = endpoint.reset(experiment.config.seed)
        if record.get("strategy") != strategy.name:
            raise TargetError(f"the service for {strategy.name!r} serves {record.get('strategy')!r}")
        return endpoint, record.get("calibration")

    return target


def evaluate_target(config: ExperimentConfig, target: Target, strategy: str,
                    scenarios: Sequence[str] = ("clean", "poison"), cache_dir=None, progress: bool = True,
                    experiment=None, subject: dict[str, str] | None = None):
    """The scenarios of `dscguard eval` for `config.seed` against one target that keeps its state.

    Unlike `evaluate`, which gives every scenario a fresh learner, a running service holds one
    model: each scenario starts where the previous one left it. The attacker prepares the same
    experiment as the service (same profile and seed: the same data splits and burn-in) for its
    batches, its validation split, its black-box surrogate, and the test split the harness measures.
    In-process (`InProcessTarget`) and over HTTP, the same seeds give the same runs. A service that serves a
    bundle is attacked from `experiment` (`service.core.bundle.serving.bundle_experiment`: the bundle and the data), and
    `subject` names them in the reports.
    """
    from attacker_sim.campaign import run_clean_oracle
    from attacker_sim.evaluation import SCENARIOS, Evaluation, build_campaign, campaign_stream
    from service.core.experiment import Experiment

    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; expected {', '.join(SCENARIOS)}")
    started = time.perf_counter()
    if experiment is None:
        experiment = Experiment.prepare(config, cache_dir=cache_dir, progress=progress)
    evaluation = Evaluation(config, [strategy], list(scenarios), subject=dict(subject or {}))
    test = experiment.test_tensors
    validation = experiment.splits.attacker_val.tensors()
    seed, campaign = config.seed, config.campaign
    for scenario in scenarios:
        torch.manual_seed(seed)
        # the stream seed `evaluate` uses: the same clean batches and trigger base as `dscguard eval`
        batches = campaign_stream(experiment, seed)
        if scenario == "clean":
            run = run_clean_oracle(target, batches, campaign.clean_batches or campaign.max_batches + 1, test,
                                   strategy, seed)
        else:
            run = build_campaign(experiment).run(target, batches, test, validation, strategy, seed)
        evaluation.runs.append(run)
    evaluation.seconds = time.perf_counter() - started
    return evaluation
