"""`dscguard stack up`'s parts: the loopback Prometheus config, a local Redis, refusing to start without a key.

The whole stack, scraped by a real Prometheus, runs in tests/test_monitoring.py.
"""

import shutil
import subprocess

import pytest
import yaml

from service.cli import main
from service.deployment.redis_queue import connect
from service.deployment.stack import PROMETHEUS_DIR, prometheus_config, redis_answers, start_redis
from tests.service_harness import REDIS_URL, free_port, needs_redis


def test_prometheus_config_scrapes_loopback_targets_with_the_deploy_rules(tmp_path):
    config = prometheus_config("127.0.0.1:18000", "127.0.0.1:19101", interval="1s")
    targets = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert targets == {"api": [{"targets": ["127.0.0.1:18000"]}], "worker": [{"targets": ["127.0.0.1:19101"]}]}
    assert config["rule_files"] == [str(PROMETHEUS_DIR / "alerts.yml")]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "1s"
    # the deploy file itself keeps the compose targets and intervals
    assert prometheus_config("a:1", "b:2")["global"]["scrape_interval"] == "15s"
    if shutil.which("promtool") is None:
        pytest.skip("needs promtool (Debian's prometheus package; .ci/run installs it)")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_start_redis_starts_one_only_where_none_answers(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    process = start_redis(url, tmp_path / "redis.log", timeout=20)
    try:
        assert process is not None and connect(url).ping()
        assert connect(url).config_get("appendonly") == {"appendonly": "yes"}  # a 202 survives its restart
        assert (tmp_path / "appendonlydir").is_dir()
        assert start_redis(url, tmp_path / "again.log") is None  # answers now: reused, nothing started
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert not redis_answers(url)


@needs_redis
def test_start_redis_reuses_the_running_one(tmp_path):
    assert start_redis(REDIS_URL, tmp_path / "redis.log") is None


def test_stack_up_refuses_to_start_without_an_api_key(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("DSCGUARD_API_KEY", raising=False)
    assert main(["stack", "up", "--run-dir", str(tmp_path), "--duration", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dscguard: error: set DSCGUARD_API_KEY") and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was started
