"""End to end: real Redis, the API under uvicorn on loopback, `dscguard worker` in a subprocess.

The worker serves the session's digits burn-in (shared through the cache directory), so its learner
starts exactly where `digits_experiment.new_learner()` does: every number it produces can be checked
against the in-process learner fed the same batches.
"""

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from attacker_sim.http_target import HttpTarget, evaluate_target
from attacker_sim.report import table_markdown
from attacker_sim.targets import InProcessTarget
from service.cli import main
from service.core.checkpoint import load_checkpoint
from service.core.config import ExperimentConfig, StrategyConfig
from service.deployment.codec import encode_json_batch, encode_safetensors_batch
from service.deployment.model_store import model_from_bytes
from service.deployment.redis_queue import RedisQueue
from service.deployment.worker import Worker, WorkerError
from service.deployment.worker.lease import Lease
from tests.service_harness import (
    ADMIN_TOKEN,
    API_KEY,
    DIGITS_OVERRIDES,
    ApiServer,
    WorkerProcess,
    assert_settled,
    free_port,
    make_settings,
    needs_redis,
    wait_ready,
    wait_until,
)

pytestmark = [needs_redis, pytest.mark.slow]
DSC = StrategyConfig(name="dsc")  # the tests that follow the discrepancy through every layer run the paper's dsc
SAFETENSORS = {"Content-Type": "application/vnd.safetensors"}


def _wait_applied(api: ApiServer, count: int, worker: WorkerProcess, timeout: float = 60) -> dict:
    return wait_until(lambda: (s := api.client.get("/v1/status", params={"audit": 50}).json())["batches_applied"]
                      == count and s, timeout, f"{count} batches applied", diagnostics=worker.output)


def _post(api: ApiServer, batch_id: str, x: torch.Tensor, y: torch.Tensor, as_uint8: bool) -> None:
    if as_uint8:  # the stream's pixels are k/255: uint8 on the wire, and the worker divides by 255 again
        pixels = (x * 255).round().to(torch.uint8)
        response = api.client.post("/v1/ingest", json=encode_json_batch(batch_id, pixels, y))
    else:
        response = api.client.post("/v1/ingest", content=encode_safetensors_batch(x, y, batch_id=batch_id),
                                   headers=SAFETENSORS)
    assert response.status_code == 202, response.text


def _served_weights(api: ApiServer) -> dict[str, torch.Tensor]:
    response = api.client.get("/v1/model", headers={"X-API-Key": ADMIN_TOKEN})
    assert response.status_code == 200
    return model_from_bytes(response.content).model.state_dict()


def _assert_same_weights(served: dict, learner) -> None:
    for name, tensor in learner.model.state_dict().items():
        torch.testing.assert_close(served[name], tensor.cpu(), rtol=0, atol=1e-6, msg=f"weights {name} differ")


def _metric(text: str, name: str, **labels) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_batches_are_applied_in_order_and_reported(digits_experiment, cache_dir, namespace, tmp_path):
    metrics_port = free_port()
    # dsc, whose per-sample discrepancy, calibration and threshold travel through every layer checked here
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=4,
                             worker_metrics_port=metrics_port, canary_every=2, strategy="dsc")
    batches = list(digits_experiment.stream_batches(6, seed=11))
    with ApiServer(settings) as api, WorkerProcess(settings) as worker:
        wait_ready(api, worker)
        for index, (x, y) in enumerate(batches):
            _post(api, f"b{index}", x, y, as_uint8=index % 2 == 0)
            if index == 2:  # an entry that bypassed the API and cannot be decoded
                queue = RedisQueue.from_settings(settings)
                queue.client.xadd(queue.stream, {"batch_id": "garbage", "dtype": "uint8", "shape": "1,1,8,8",
                                                 "x": b"\x00", "y": b""})
        status = _wait_applied(api, 6, worker)
        audit = list(reversed(status["audit"]))

        reference = digits_experiment.new_learner(DSC)
        reports = [reference.step(x, y) for x, y in batches]
        assert [r["batch_id"] for r in audit] == [f"b{i}" for i in range(6)]
        assert [r["batch_index"] for r in audit] == list(range(6))
        assert [r["model_version"] for r in audit] == list(range(1, 7))
        assert [r["flagged"] for r in audit] == [r.flagged_count for r in reports]
        assert [r["threshold"] for r in audit] == pytest.approx([r.threshold for r in reports], abs=1e-9)
        assert [r["loss"] for r in audit] == pytest.approx([r.loss for r in reports], abs=1e-5)
        _assert_same_weights(_served_weights(api), reference)
        assert status["model_version"] == 6 and status["threshold"] == pytest.approx(reference.threshold())
        assert status["calibration"] == reference.calibration.to_dict()
        assert status["canary_accuracy"] is not None and 0.5 < status["canary_accuracy"] <= 1.0
        applied = api.client.get("/v1/batches/b5").json()
        assert applied["state"] == "applied" and applied["record"] == audit[-1]
        np.testing.assert_allclose(applied["discrepancy"], reports[-1].discrepancy_before, rtol=1e-4, atol=1e-6)
        dead = api.client.get("/v1/batches/garbage").json()
        assert dead["state"] == "dead_letter" and "expected 64 and 8" in dead["reason"]

        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        samples = sum(r.samples for r in reports)
        assert _metric(worker_metrics, "dscguard_batches_applied_total") == 6
        assert _metric(worker_metrics, "dscguard_samples_applied_total") == samples
        assert _metric(worker_metrics, "dscguard_samples_flagged_total") == sum(r.flagged_count for r in reports)
        assert _metric(worker_metrics, "dscguard_memorization_discrepancy_count") == samples
        assert _metric(worker_metrics, "dscguard_memorization_discrepancy_count", verdict="flagged") == sum(
            r.flagged_count for r in reports)
        assert _metric(worker_metrics, "dscguard_dead_letters_total", reason="entry") == 1
        assert _metric(worker_metrics, "dscguard_model_version") == 6
        assert _metric(worker_metrics, "dscguard_step_duration_seconds_count", phase="prepare") == 6
        assert _metric(worker_metrics, "dscguard_canary_accuracy") == pytest.approx(status["canary_accuracy"])
        api_metrics = api.client.get("/metrics").text
        assert _metric(api_metrics, "dscguard_ingested_samples_total") == samples

        assert worker.terminate() == 0, worker.output()
    queue = RedisQueue.from_settings(settings)
    assert_settled(queue)  # every entry committed by a checkpoint and acknowledged
    assert queue.client.xlen(queue.dead_letters) == 1
    _, meta = load_checkpoint(Path(settings.checkpoint_dir) / "step-000000000006")
    assert meta["batches_applied"] == 6 and meta["extra"]["recent_batch_ids"] == [f"b{i}" for i in range(6)]
    assert meta["extra"]["last_applied_id"] == audit[-1]["entry_id"]


def test_worker_restarts_neither_lose_nor_repeat_updates(digits_experiment, cache_dir, namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=4)
    batches = list(digits_experiment.stream_batches(12, seed=12))
    reference = digits_experiment.new_learner()
    with ApiServer(settings) as api:
        with WorkerProcess(settings) as crashed:
            wait_ready(api, crashed)
            for index in range(6):
                _post(api, f"b{index}", *batches[index], as_uint8=False)
            _wait_applied(api, 6, crashed)
            crashed.kill()  # b4 and b5 are applied but in no checkpoint: they must be replayed, once
        for index in range(6, 10):
            _post(api, f"b{index}", *batches[index], as_uint8=False)
        with WorkerProcess(settings) as resumed:
            status = _wait_applied(api, 10, resumed)
            assert resumed.terminate() == 0, resumed.output()
        assert "replaying 2 entries after the checkpoint" in resumed.output()
        for x, y in batches[:10]:
            reference.step(x, y)
        _assert_same_weights(_served_weights(api), reference)
        assert status["batches_applied"] == 10 and status["model_version"] == 10

        # after a clean stop (SIGTERM above), a bounded run resumes and stops by itself after --max-batches
        for index in range(10, 12):
            _post(api, f"b{index}", *batches[index], as_uint8=True)
        bounded = WorkerProcess(settings, "--max-batches", "2")
        assert bounded.wait() == 0, bounded.output()
        for x, y in batches[10:]:
            reference.step(x, y)
        _assert_same_weights(_served_weights(api), reference)
        assert api.client.get("/v1/status").json()["batches_applied"] == 12
    assert_settled(RedisQueue.from_settings(settings))


def test_a_second_worker_on_a_namespace_is_refused(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, heartbeat_ttl_seconds=0.2)
    Lease(RedisQueue.from_settings(settings), "the-first-worker", ttl_seconds=30).acquire(wait_seconds=0)
    with pytest.raises(WorkerError, match="held by worker 'the-first-worker'"):
        Worker(settings).start()


def test_campaigns_give_the_same_accuracies_in_process_and_over_http(digits_experiment, cache_dir, namespace,
                                                                      tmp_path, monkeypatch, capsys):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, strategy="dsc")
    campaign = {"max_batches": 2, "clean_batches": 2}
    config = ExperimentConfig.from_profile("digits", **DIGITS_OVERRIDES, campaign=campaign, strategy={"name": "dsc"})
    learner = digits_experiment.new_learner(DSC)
    in_process = evaluate_target(config, InProcessTarget(learner), "dsc", cache_dir=cache_dir, progress=False)
    with ApiServer(settings) as api, WorkerProcess(settings) as worker:
        wait_ready(api, worker)
        target = HttpTarget(api.url, API_KEY, ADMIN_TOKEN, timeout_seconds=60)
        try:
            over_http = evaluate_target(config, target, "dsc", cache_dir=cache_dir, progress=False)
        finally:
            target.close()
        for local, remote in zip(in_process.runs, over_http.runs, strict=True):
            assert remote.scenario == local.scenario and remote.batches == local.batches
            assert remote.trace == pytest.approx(local.trace, abs=1e-6)
            assert (remote.flagged_rate, remote.corrected_rate) == (local.flagged_rate, local.corrected_rate)
            for remote_md, local_md in zip(remote.discrepancy, local.discrepancy, strict=True):
                np.testing.assert_allclose(remote_md, local_md, atol=1e-5)
        poison = over_http.runs[1]
        assert poison.trigger_acc is not None and poison.trigger_flagged_rate is not None

        # `dscguard attack` prints the eval table for the same runs (the service continues from its state,
        # so compare against an in-process learner at that state: the one that ran the scenarios above)
        monkeypatch.setenv("DSCGUARD_API_KEY", API_KEY)
        monkeypatch.setenv("DSCGUARD_ADMIN_TOKEN", ADMIN_TOKEN)
        monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
        overrides = [f"{section}.{k}={v}" for section, fields in {**DIGITS_OVERRIDES, "campaign": campaign}.items()
                     for k, v in fields.items()]
        args = ["attack", "--target", api.url, "--profile", "digits", "--scenarios", "clean", "--no-progress",
                "--set", "strategy.name=dsc"]
        assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    expected = evaluate_target(config, InProcessTarget(learner), "dsc", scenarios=["clean"], cache_dir=cache_dir,
                               progress=False)
    # identical but for the last column, seconds per step
    assert _without_timing(printed) == _without_timing(table_markdown(expected))


def _without_timing(table: str) -> list[str]:
    return [re.sub(r"\| [0-9.]+ \|$", "|", line) for line in table.strip().splitlines() if line.startswith("|")]
