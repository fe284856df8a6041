"""A real Prometheus scrapes the native stack (`dscguard stack up`) while batches stream in; then every PromQL
expression of the Grafana dashboard and of the alert rules is evaluated through Prometheus's HTTP API.

Needs Redis (the test's own namespace) and Debian's `prometheus` package (.ci/run installs it).
"""

import os
import shutil
import sys

import httpx
import pytest
import torch

from service.deployment.codec import encode_json_batch
from service.deployment.processes import listening, spawn, stop
from service.deployment.redis_queue import RedisQueue
from tests.monitoring_queries import (
    ALERTS,
    alert_rules,
    comparison_operands,
    dashboard_queries,
    queryable,
)
from tests.service_harness import (
    API_KEY,
    DIGITS_OVERRIDES,
    ROOT,
    free_port,
    make_settings,
    needs_redis,
    redis_namespace,
    settings_env,
    wait_until,
)

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="needs a prometheus binary (Debian's package; .ci/run installs it)")
pytestmark = [needs_redis, needs_prometheus, pytest.mark.slow]
CLEAN_BATCHES, NOISE_BATCHES = 6, 2


def _query(prometheus: str, expr: str) -> list:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _queries_without_data(prometheus: str) -> list[str]:
    """Dashboard queries and alert operands (the sides of the condition, not its verdict) that return nothing."""
    empty = [f"{q.where}: {q.expr}" for q in dashboard_queries() if not _query(prometheus, queryable(q.expr))]
    for rule in alert_rules():
        _query(prometheus, rule["expr"])  # evaluates, whether it fires or not
        empty += [f"alert {rule['alert']}: {operand}" for operand in comparison_operands(rule["expr"])
                  if not operand.replace(".", "", 1).isdigit() and not _query(prometheus, operand)]
    return empty


def _stream(api: httpx.Client, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Clean batches and uniform-noise batches (which the defense flags), one wrong key, one undecodable entry."""
    for index, (x, y) in enumerate(batches):
        if index >= CLEAN_BATCHES:
            x = torch.rand(x.shape, generator=torch.Generator().manual_seed(index))
        pixels = (x * 255).round().to(torch.uint8)
        response = api.post("/v1/ingest", json=encode_json_batch(f"b{index}", pixels, y))
        assert response.status_code == 202, response.text
    assert api.post("/v1/ingest", json={}, headers={"X-API-Key": "wrong"}).status_code == 401


def test_prometheus_scrapes_the_stack_and_every_dashboard_and_alert_query_returns_data(digits_experiment, cache_dir,
                                                                                       tmp_path):
    batches = list(digits_experiment.stream_batches(CLEAN_BATCHES + NOISE_BATCHES, seed=31))
    with redis_namespace() as namespace:
        # dsc with the gate as its action and a rolling auxiliary: one worker feeds every panel (discrepancy,
        # promotions, the update gate), the noise batches being flagged and judged
        overrides = {**DIGITS_OVERRIDES, "strategy": {"name": "dsc", "flag_action": "gate", "auxiliary": "rolling",
                                                      "auxiliary_window": 2, "auxiliary_every": 2,
                                                      "auxiliary_ring": 1}}
        settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, worker_metrics_port=free_port(),
                                 canary_every=1, checkpoint_every=3, config_overrides=overrides)
        api_port, prometheus_port = free_port(), free_port()
        api_url, prometheus = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prometheus_port}"
        env = {**os.environ, **settings_env(settings), "DSCGUARD_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
        env.pop("DSCGUARD_CHECKPOINT_DIR")  # the stack's default: under its run directory
        log = tmp_path / "stack.out"
        stack = spawn([sys.executable, "-m", "service.cli", "stack", "up", "--api-port", str(api_port),
                       "--prometheus-port", str(prometheus_port), "--scrape-interval", "1s", "--run-dir",
                       str(tmp_path / "stack"), "--duration", "240"], log, env=env, cwd=tmp_path)

        def output() -> str:
            return log.read_text(errors="replace")

        try:
            wait_until(lambda: "Ctrl-C stops everything" in output() or stack.poll() is not None, 60,
                       "the stack to start", interval=0.1, diagnostics=output)
            assert stack.poll() is None, output()
            assert f"prometheus: {prometheus}" in output() and f"api: {api_url}" in output()
            with httpx.Client(base_url=api_url, headers={"X-API-Key": API_KEY}, timeout=30) as api:
                wait_until(lambda: stack.poll() is None and api.get("/health/ready").status_code == 200, 90,
                           "the worker to be ready", interval=0.2, diagnostics=output)
                _stream(api, batches)
                queue = RedisQueue.from_settings(settings)  # an entry that bypassed the API: a dead letter
                queue.client.xadd(queue.stream, {"batch_id": "garbage", "dtype": "uint8", "shape": "1,1,8,8",
                                                 "x": b"\x00", "y": b""})
                status = wait_until(lambda: (s := api.get("/v1/status").json())["batches_applied"] == len(batches)
                                    and s, 60, "every batch applied", diagnostics=output)
            assert status["canary_accuracy"] is not None
            wait_until(lambda: [r["value"][1] for r in _query(prometheus, "dscguard_batches_applied_total")]
                       == [str(len(batches))], 30, "Prometheus to scrape the last batch", interval=0.2)
            # the noise batches were flagged: both verdicts are in the histogram
            verdicts = _query(prometheus, "sum by (verdict) (dscguard_memorization_discrepancy_count)")
            assert {r["metric"]["verdict"] for r in verdicts} == {"clean", "flagged"}

            # a series born in the last scrape has one sample, and a rate needs two: a few more scrapes at most
            wait_until(lambda: not _queries_without_data(prometheus), 20, "data for every dashboard and alert query",
                       interval=1.0, diagnostics=lambda: "\n".join(_queries_without_data(prometheus)))
            rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
            loaded = {r["name"]: r for group in rules for r in group["rules"]}
            assert set(loaded) == {rule["alert"] for rule in alert_rules()}, f"rules of {ALERTS} not all loaded"
            for name, rule in loaded.items():
                assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
        finally:
            stop(stack, timeout=120)  # SIGTERM: the stack stops its children and exits 0
        assert stack.returncode == 0, output()
        assert "stopping" in output()
        for port in (api_port, prometheus_port, settings.worker_metrics_port):
            assert not listening(port), f"port {port} still open after the stack stopped"
