"""`dscguard attack --targets`: dscguard eval's runs through real services on loopback, one worker and one API per
strategy, each reset (admin token) to the seed's starting state before each run; its results.json agrees with the
in-process evaluation's (`dscguard compare`, the stated tolerances). Without Docker: the compose eval profile runs
the same command (tests/test_compose_real.py)."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from attacker_sim.agreement import compare_results, max_difference
from attacker_sim.evaluation import evaluate
from attacker_sim.http_target import HttpTarget, TargetError, reset_targets
from attacker_sim.report import results_document
from service.cli import main
from service.core.config import ExperimentConfig
from service.deployment.redis_queue import RedisQueue
from tests.service_harness import (
    ADMIN_TOKEN,
    API_KEY,
    DIGITS_OVERRIDES,
    ApiServer,
    WorkerProcess,
    make_settings,
    needs_redis,
    redis_namespace,
    wait_until,
)

pytestmark = [needs_redis, pytest.mark.slow]
STRATEGIES = ("st", "dsc")
SEED = 1  # not the workers' configured seed (0): every run starts from a reset to another burn-in
CAMPAIGN = {"max_batches": 3, "clean_batches": 3}


def test_attack_with_targets_reproduces_the_in_process_evaluation(cache_dir, tmp_path, monkeypatch, capsys):
    config = ExperimentConfig.from_profile("digits", **DIGITS_OVERRIDES, campaign=CAMPAIGN)
    in_process = results_document(evaluate(config, strategies=STRATEGIES, seeds=[SEED], cache_dir=cache_dir,
                                           progress=False)).model_dump(mode="json")
    (tmp_path / "in-process.json").write_text(json.dumps(in_process))
    with ExitStack() as stack:
        services = {}
        for strategy in STRATEGIES:
            namespace = stack.enter_context(redis_namespace())
            settings = make_settings(namespace, tmp_path / strategy, cache_dir=cache_dir, strategy=strategy)
            api = stack.enter_context(ApiServer(settings))
            worker = stack.enter_context(WorkerProcess(settings))
            services[strategy] = (api, worker, RedisQueue.from_settings(settings))
        for api, worker, _ in services.values():
            wait_until(lambda api=api: api.client.get("/health/ready").status_code == 200, 120, "a service ready",
                       interval=0.2, diagnostics=worker.output)

        # a service that stands for another strategy is refused
        wrong = HttpTarget(services["dsc"][0].url, API_KEY, ADMIN_TOKEN, timeout_seconds=60)
        try:
            with pytest.raises(TargetError, match="the service for 'st' serves 'dsc'"):
                evaluate(config, strategies=["st"], seeds=[SEED], cache_dir=cache_dir, progress=False,
                         targets=reset_targets({"st": wrong}))
        finally:
            wrong.close()

        monkeypatch.setenv("DSCGUARD_API_KEY", API_KEY)
        monkeypatch.setenv("DSCGUARD_ADMIN_TOKEN", ADMIN_TOKEN)
        monkeypatch.setenv("DSCGUARD_CACHE_DIR", str(cache_dir))
        overrides = [f"{section}.{k}={v}" for section, fields in {**DIGITS_OVERRIDES, "campaign": CAMPAIGN}.items()
                     for k, v in fields.items()]
        out = tmp_path / "over-http"
        args = ["attack", "--profile", "digits", "--seeds", str(SEED), "--no-progress", "--no-plots",
                "--targets", *(f"{s}={services[s][0].url}" for s in STRATEGIES), "--out", str(out),
                "--compare", str(tmp_path / "in-process.json"), *(a for o in overrides for a in ("--set", o))]
        assert main(args) == 0, capsys.readouterr().out
        printed = capsys.readouterr().out
        assert "agrees with" in printed
        # each run began with a reset of its strategy's worker to the seed, audited by its API (dsc's worker was also
        # reset once by the refused attempt above)
        for strategy, (_, _, queue) in services.items():
            audit = queue.admin_audit_tail(10)
            expected = 2 + (strategy == "dsc")
            assert [(r["action"], r["seed"]) for r in audit] == [("reset", SEED)] * expected, (strategy, audit)
            assert queue.worker_status()["seed"] == SEED
    over_http = json.loads((out / "results.json").read_text())
    assert not compare_results(in_process, over_http)
    print(f"largest difference: accuracies {max_difference(in_process, over_http):.4f}, rates "
          f"{max_difference(in_process, over_http, rates=True):.4f}")
