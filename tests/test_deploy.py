"""The deployment files, checked without a Docker engine.

docker-compose.yml is validated by Debian's docker-compose 1.29 (`config` needs no engine; `.ci/run` installs it)
and by the Compose v2 plugin where one is installed; every file it names exists; the Dockerfiles' COPY sources
exist in the build context and are not excluded by .dockerignore; .env.example covers every variable; the
Grafana dashboard uses the provisioned datasource and only metrics the service exports; promtool accepts the
Prometheus config and rules.
"""

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.monitoring_queries import (
    ALERTS,
    DASHBOARD,
    DEPLOY,
    ROOT,
    alert_rules,
    dashboard,
    dashboard_queries,
    exported_metric_names,
    metric_names,
    provisioned_datasource_uid,
)

COMPOSE, GPU_OVERRIDE, ENV_EXAMPLE = ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml", ROOT / ".env.example"
BUNDLE_OVERRIDE = ROOT / "docker-compose.bundle.yml"
EVAL_STRATEGIES = ("st", "gc", "at", "dsc", "guard")  # the eval profile: one worker and one api per strategy
EVAL_SERVICES = {f"eval-{part}-{s}" for s in EVAL_STRATEGIES for part in ("worker", "api")}
SERVICES = {"redis", "api", "worker", "prometheus", "grafana", "reports-dir", "attacker"} | EVAL_SERVICES
ONE_SHOT = {"reports-dir"}  # runs to completion before the attacker: no healthcheck, waited for by exit status
OUTPUT_DIRS = {"./reports"}  # bind mounts the stack writes to: created on first run, ignored by git
DSCGUARD_IMAGES = {"api", "worker", "attacker", "reports-dir"} | EVAL_SERVICES


def _has_compose_v2() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0


COMPOSE_TOOLS = [
    pytest.param(["docker-compose"], id="docker-compose-1.29", marks=pytest.mark.skipif(
        shutil.which("docker-compose") is None, reason="needs Debian's docker-compose (.ci/run installs it)")),
    pytest.param(["docker", "compose"], id="compose-v2", marks=pytest.mark.skipif(
        not _has_compose_v2(), reason="the docker compose plugin is not installed")),
]


def _compose_config(tool: list[str], *args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    # the variables come from the env file only, never from whoever runs the tests
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSCGUARD_", "GRAFANA_"))}
    return subprocess.run([*tool, "--env-file", str(env_file), *args, "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_compose_file_validates_with_the_eval_profile(tool):
    result = _compose_config(tool, "--profile", "eval")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    assert services["api"]["environment"]["DSCGUARD_API_KEY"] == "change-me-client-key"  # from the env file
    for name, service in services.items():
        if name not in ONE_SHOT:
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL") and not service["healthcheck"].get("disable"), name
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert condition["condition"] == expected, (name, dependency)
    assert set(services["attacker"]["depends_on"]) == {"reports-dir"} | EVAL_SERVICES
    assert all(services[name]["profiles"] == ["eval"] for name in EVAL_SERVICES | {"attacker"})
    attack = services["attacker"]["command"]
    assert attack[attack.index("--out") + 1] == "/reports" and attack[attack.index("--seeds") + 1] == "0,1,2"
    # each strategy's api and worker share a namespace of their own, and the attacker targets that api for it
    targets = attack[attack.index("--targets") + 1 : attack.index("--out")]
    assert targets == [f"{s}=http://eval-api-{s}:8000" for s in EVAL_STRATEGIES]
    for strategy in EVAL_STRATEGIES:
        worker = services[f"eval-worker-{strategy}"]["environment"]
        api = services[f"eval-api-{strategy}"]["environment"]
        assert worker["DSCGUARD_NAMESPACE"] == api["DSCGUARD_NAMESPACE"] == f"eval-{strategy}"
        assert worker["DSCGUARD_STRATEGY"] == strategy
        assert worker["DSCGUARD_CHECKPOINT_DIR"].endswith(f"/eval-{strategy}")
        assert api["DSCGUARD_ADMIN_TOKEN"] == worker["DSCGUARD_API_KEY"].replace("client-key", "admin-token")
    assert "deploy" not in services["worker"]  # the default asks for no GPU: it starts on any host


def test_the_stack_keeps_its_state_in_named_volumes_and_mounts_what_the_services_read():
    compose = _raw_compose()
    services = compose["services"]

    def mounts(service: str) -> dict[str, str]:
        return {target: source for source, target, *_ in (v.split(":") for v in services[service]["volumes"])}

    checkpoints = services["worker"]["environment"]["DSCGUARD_CHECKPOINT_DIR"]
    assert mounts("worker")[checkpoints] == "checkpoints" and "checkpoints" in compose["volumes"]
    storage = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--storage.tsdb.path"))
    assert mounts("prometheus")[storage] == "prometheus-data" and "prometheus-data" in compose["volumes"]
    assert mounts("grafana")["/var/lib/grafana"] == "grafana-data"
    # a 202 lives only in Redis until a checkpoint holds it: the queue is an fsynced append-only file on a volume
    redis_args = services["redis"]["command"]
    option = {name: redis_args[i + 1] for i, name in enumerate(redis_args) if name.startswith("--")}
    assert option["--appendonly"] == "yes" and option["--appendfsync"] in {"always", "everysec"}
    assert mounts("redis")[option["--dir"]] == "redis-data" and "redis-data" in compose["volumes"]

    # Prometheus reads its config (and the rule files it names) from the mounted deploy/prometheus
    prometheus_dir = ROOT / mounts("prometheus")["/etc/prometheus"]
    config = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    assert all((prometheus_dir / rules).is_file() for rules in config["rule_files"])
    assert {job["static_configs"][0]["targets"][0].split(":")[0] for job in config["scrape_configs"]} == {
        "api", "worker"}  # compose service names
    assert services["worker"]["environment"]["DSCGUARD_WORKER_METRICS_HOST"] == "0.0.0.0"

    # Grafana: the provisioned dashboard folder is the mounted one, and the datasource is the prometheus service
    grafana = mounts("grafana")
    (provider,) = yaml.safe_load((ROOT / grafana["/etc/grafana/provisioning"] / "dashboards" /
                                  "dashboards.yml").read_text())["providers"]
    dashboards_dir = ROOT / grafana[provider["options"]["path"]]
    assert (dashboards_dir / "dscguard.json").samefile(DASHBOARD)
    home = Path(services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (ROOT / grafana[str(home.parent)] / home.name).is_file()
    (datasource,) = yaml.safe_load((ROOT / grafana["/etc/grafana/provisioning"] / "datasources" /
                                    "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"


def _with_defaults(text: str) -> str:
    """`${NAME:-default}` as compose reads it when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_every_path_the_compose_files_name_exists():
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            if "build" in service:
                context = ROOT / service["build"]["context"]
                assert context.is_dir() and (context / service["build"]["dockerfile"]).is_file(), name
            for volume in service.get("volumes", []):
                source = _with_defaults(volume).split(":")[0]
                if source.startswith((".", "/")):
                    assert source in OUTPUT_DIRS or (ROOT / source).exists(), f"{name}: {source}"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert all(f"/{Path(d).name}/" in ignored for d in OUTPUT_DIRS)


def _dockerfiles() -> list[tuple[Path, Path]]:
    """(build context, Dockerfile) of every service that builds, base file and override."""
    builds = {}
    for path in (COMPOSE, GPU_OVERRIDE):
        for service in yaml.safe_load(path.read_text())["services"].values():
            if "build" in service:
                context = ROOT / service["build"]["context"]
                builds[context / service["build"]["dockerfile"]] = context
    return [(context, dockerfile) for dockerfile, context in sorted(builds.items())]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Every ARG and its default ('' when it has none)."""
    return dict((args.split("=", 1) + [""])[:2] for instruction, args in instructions if instruction == "ARG")


def _expand(word: str, build_args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda match: build_args[match.group(1)], word)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or a folder above it) decides."""
    parts = Path(path).parts
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_dockerfiles_parse_and_copy_only_what_the_build_context_has():
    dockerfiles = _dockerfiles()
    assert {d.name for _, d in dockerfiles} == {"Dockerfile", "Dockerfile.cuda"}
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL",
             "HEALTHCHECK", "STOPSIGNAL", "VOLUME", "SHELL"}
    for context, dockerfile in dockerfiles:
        instructions = _instructions(dockerfile)
        assert [i for i, _ in instructions if i != "ARG"][0] == "FROM", dockerfile
        assert {i for i, _ in instructions} <= known, dockerfile
        patterns = [p.strip() for p in (context / ".dockerignore").read_text().splitlines()
                    if p.strip() and not p.startswith("#")]
        defaults = _build_args(instructions)
        copies = [shlex.split(args) for instruction, args in instructions if instruction in ("COPY", "ADD")]
        assert copies, dockerfile
        for words in copies:
            if any(w.startswith("--from=") for w in words):  # from an earlier stage, not the build context
                continue
            words = [_expand(w, defaults) for w in words if not w.startswith("--")]
            for source in words[:-1]:
                assert (context / source).exists(), f"{dockerfile.name}: COPY {source}: not in the build context"
                assert not _dockerignored(source, patterns), f"{dockerfile.name}: COPY {source}: in .dockerignore"
        assert ("ENTRYPOINT", '["dscguard"]') in instructions, dockerfile
        assert any(i == "USER" and args != "root" for i, args in instructions), f"{dockerfile}: runs as root"


def test_images_build_offline_from_an_argument_base_and_wheelhouse_without_a_registry_pull():
    """Issue 15: no `# syntax=` line (BuildKit would pull its frontend image), the base image a build argument
    (CI passes one it built), torch's index and a wheelhouse as build arguments (an offline build), the
    wheelhouse installed in a stage of its own (its wheels never reach the image)."""
    for dockerfile in (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"):
        assert not re.search(r"^#\s*syntax\s*=", dockerfile.read_text(), re.M | re.I), dockerfile
        instructions = _instructions(dockerfile)
        arguments = _build_args(instructions)
        assert {"BASE_IMAGE", "TORCH_INDEX_URL", "WHEELHOUSE"} <= set(arguments), dockerfile
        assert arguments["BASE_IMAGE"] == "python:3.11-slim"
        assert (DEPLOY.parent / arguments["WHEELHOUSE"]).is_dir()
        stages = [args for instruction, args in instructions if instruction == "FROM"]
        assert all(stage.split()[0] == "${BASE_IMAGE}" for stage in stages), stages
        assert len(stages) == 2 and stages[0].endswith(" AS dependencies"), stages
        (wheelhouse_copy,) = [i for i, (instruction, args) in enumerate(instructions)
                              if instruction == "COPY" and "${WHEELHOUSE}" in args]
        assert wheelhouse_copy < [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"][1]
        install = " ".join(args for instruction, args in instructions if instruction == "RUN")
        assert "--no-index --find-links /wheelhouse" in install and '--index-url $TORCH_INDEX_URL' in install
        assert "torch==2.14.1 torchvision==0.29.1" in install
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not _dockerignored("deploy/wheelhouse/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", patterns)
    assert _dockerignored("deploy/Dockerfile", patterns)


def test_services_run_read_only_and_healthchecks_need_only_what_the_images_have():
    services = _raw_compose()["services"]
    for name, service in services.items():
        if name == "grafana":  # not started here (no image): its writable paths are unverified
            continue
        assert service.get("read_only") is True, f"{name}: root filesystem writable"
        assert "/tmp" in service.get("tmpfs", []), f"{name}: no tmpfs for /tmp"
    for name in DSCGUARD_IMAGES:
        assert services[name]["image"] == "dscguard:cpu", name
        test = services[name].get("healthcheck", {}).get("test", [])
        # the slim image has Python and no curl or wget
        assert not test or test[:2] == ["CMD", "python"], f"{name}: {test}"
    assert "user" not in services["api"] and "user" not in services["worker"]  # the image's unprivileged user
    # the one-shot that prepares the reports folder: root with CHOWN only, on the same host folder as the attacker
    prepare, attacker = services["reports-dir"], services["attacker"]
    assert prepare["user"] == "0:0" and prepare["cap_drop"] == ["ALL"] and prepare["cap_add"] == ["CHOWN"]
    assert prepare["volumes"] == attacker["volumes"] and attacker["volumes"][0].endswith(":/reports")
    assert prepare["profiles"] == attacker["profiles"] == ["eval"]


def test_the_reports_folder_is_handed_to_the_reports_owner_only_when_the_daemon_created_it(tmp_path):
    """reports-dir's script, run here on folders like the ones it meets: a root-owned folder (the daemon
    created it) goes to DSCGUARD_REPORTS_UID, a folder someone owns stays theirs."""
    script = _raw_compose()["services"]["reports-dir"]["command"][0]
    calls = []
    for owner in (0, 1234):
        def fake_stat(path, owner=owner):
            return os.stat_result((0o40755, 0, 0, 2, owner, owner, 0, 0, 0, 0))

        namespace = {"os": type("os", (), {"environ": {"REPORTS_UID": "1000", "REPORTS_GID": "1001"},
                                           "stat": staticmethod(fake_stat),
                                           "chown": staticmethod(lambda *args: calls.append(args))}),
                     "print": lambda *args: None}
        exec(script.replace("import os\n", ""), namespace)
    assert calls == [("/reports", 1000, 1001)]


def test_dockerignore_keeps_data_and_history_out_of_the_build_context():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for path in (".git", ".env", "data", "reports", "runs", "checkpoints", "service/__pycache__"):
        assert _dockerignored(path, patterns), path
    assert not _dockerignored("service/deployment/worker/__init__.py", patterns)


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_env_example_sets_exactly_the_variables_the_compose_files_use_and_no_secret():
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text() + GPU_OVERRIDE.read_text()))
    example = _env_example()
    assert used == set(example)
    for key, value in example.items():
        if re.search("KEY|TOKEN|PASSWORD", key):
            assert value.startswith("change-me"), f"{key} in .env.example must be a placeholder"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_compose_refuses_to_run_without_the_keys(tool, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose_config(tool, env_file=empty)
    assert result.returncode != 0
    assert "DSCGUARD_API_KEY" in result.stderr


def test_the_default_worker_needs_no_gpu_and_the_override_only_adds_one():
    """Compose v1 could not start the stack on a CPU host: the base file reserved an NVIDIA device and the CPU
    override's `!reset` did not parse. Now the base asks for nothing and the GPU override only adds."""
    worker = _raw_compose()["services"]["worker"]
    assert "deploy" not in worker and worker["image"] == "dscguard:cpu"
    assert worker["build"]["dockerfile"] == _raw_compose()["services"]["api"]["build"]["dockerfile"]
    assert "!reset" not in COMPOSE.read_text() + GPU_OVERRIDE.read_text()
    gpu = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]
    assert set(gpu) == {"worker"} and gpu["worker"]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    (device,) = gpu["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_the_gpu_override_merges_with_every_compose(tool):
    result = _compose_config(tool, "-f", str(COMPOSE), "-f", str(GPU_OVERRIDE))
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker"]
    assert worker["image"] == "dscguard:cuda" and worker["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_the_bundle_override_only_adds_to_the_worker():
    assert "!reset" not in BUNDLE_OVERRIDE.read_text()
    services = yaml.safe_load(BUNDLE_OVERRIDE.read_text())["services"]
    assert set(services) == {"worker"} and set(services["worker"]) == {"environment", "volumes"}


def _bind_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only) of a service's bind mounts, from `config` of Compose v1 (short syntax) or v2."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        else:
            mounts[volume["target"]] = (volume["source"], volume.get("read_only", False))
    return mounts


@pytest.mark.parametrize("tool", COMPOSE_TOOLS)
def test_the_bundle_override_mounts_the_bundle_read_only_for_the_worker(tool, tmp_path):
    result = _compose_config(tool, "-f", str(COMPOSE), "-f", str(BUNDLE_OVERRIDE))
    assert result.returncode != 0 and "set DSCGUARD_BUNDLE_DIR to your bundle directory" in result.stderr

    env_file = tmp_path / ".env"
    env_file.write_text(f"{ENV_EXAMPLE.read_text()}\nDSCGUARD_BUNDLE_DIR={tmp_path / 'bundle'}\n")
    result = _compose_config(tool, "-f", str(COMPOSE), "-f", str(BUNDLE_OVERRIDE), env_file=env_file)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    worker = services["worker"]
    assert worker["environment"]["DSCGUARD_BUNDLE"] == "/bundle"
    assert worker["environment"]["DSCGUARD_PROFILE"] == "digits"  # the base's environment is kept, not replaced
    mounts = _bind_mounts(worker)
    assert mounts["/bundle"] == (str(tmp_path / "bundle"), True)
    assert mounts["/var/lib/dscguard/checkpoints"][0] == "checkpoints"  # the base's volumes are kept too
    assert "DSCGUARD_BUNDLE" not in services["api"]["environment"] and "/bundle" not in _bind_mounts(services["api"])


def test_dashboard_uses_the_provisioned_datasource_and_no_import_inputs():
    uid = provisioned_datasource_uid()
    assert "${DS_" not in DASHBOARD.read_text()
    board = dashboard()
    assert "__inputs" not in board and board["uid"]
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"]["uid"] == uid for target in panel["targets"]), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_draws_the_threshold_on_the_discrepancy_by_verdict():
    (panel,) = [p for p in dashboard()["panels"] if "verdict" in p["title"]]
    exprs = [target["expr"] for target in panel["targets"]]
    assert any("dscguard_threshold" in expr for expr in exprs)
    assert any("dscguard_memorization_discrepancy_bucket" in expr and "by (verdict, le)" in expr for expr in exprs)


def test_dashboard_and_alerts_query_only_metrics_the_service_exports():
    exported = exported_metric_names()
    queries = [(q.where, q.expr) for q in dashboard_queries()]
    queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr}"
        assert names <= exported, f"{where}: {sorted(names - exported)} are not exported by the service"


def test_alerts_cover_the_failure_modes():
    names = {rule["alert"] for rule in alert_rules()}
    assert {"DscguardFlaggedRateSpike", "DscguardMedianDiscrepancyAboveThreshold", "DscguardQueueLag",
            "DscguardWorkerDown", "DscguardCanaryAccuracyDrop", "DscguardPromotionRefused"} <= names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], rule["alert"]


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="needs promtool (Debian's prometheus package; .ci/run installs it)")


@needs_promtool
def test_promtool_accepts_the_prometheus_config_and_rules():
    for command in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                    ["check", "rules", str(ALERTS)]):
        result = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout
