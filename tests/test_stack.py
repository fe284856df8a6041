"""`dscguard stack up`'s parts: the loopback Prometheus config, a local Redis, refusing to start without a key; and
the process harness it shares with the tests and benchmarks (service/deployment/processes.py).

The whole stack, scraped by a real Prometheus, runs in tests/test_monitoring.py.
"""

import shutil
import subprocess
import sys
import time

import pytest
import yaml

from service.cli import main
from service.deployment.processes import (
    ProcessFailed,
    RedisServer,
    cpu_seconds,
    redis_answers,
    resident_megabytes,
    spawn,
    stop,
    wait_for,
)
from service.deployment.redis_queue import connect
from service.deployment.stack import PROMETHEUS_DIR, prometheus_config, start_redis
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
        stop(process, timeout=20)
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


def test_wait_for_fails_as_soon_as_a_watched_child_exits_quoting_its_log(tmp_path):
    log = tmp_path / "child.log"
    child = spawn([sys.executable, "-c", "print('bad config'); raise SystemExit(3)"], log)
    started = time.monotonic()
    with pytest.raises(ProcessFailed, match=r"exited with status 3 while waiting for the child to answer:\nbad config"):
        wait_for(lambda: False, 60, "the child to answer", watch=[child], log=log, interval=0.05)
    assert time.monotonic() - started < 30  # not the whole timeout
    assert wait_for(lambda: "value", 1, "nothing") == "value"  # the condition's value comes back


def test_stop_kills_a_child_that_ignores_sigterm_and_reports_its_status(tmp_path):
    log = tmp_path / "stubborn.log"
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = spawn([sys.executable, "-c", code], log)
    wait_for(lambda: "up" in log.read_text(), 30, "the child to start", watch=[child], log=log, interval=0.05)
    assert resident_megabytes(child.pid) > 1 and cpu_seconds(child.pid) >= 0
    assert stop(child, timeout=0.5) == -9
    assert resident_megabytes(child.pid) is None and cpu_seconds(child.pid) is None
    assert stop(child) == -9  # already stopped: nothing to do


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_comes_back_after_a_kill_with_what_it_acknowledged(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        connect(server.url).set("kept", "1")
        server.kill()
        assert not redis_answers(server.url)
        server.start()
        assert connect(server.url).get("kept") == b"1"
    assert not redis_answers(server.url) and server.process.returncode is not None
