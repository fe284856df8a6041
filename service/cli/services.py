"""The service's subcommands of `dscguard`: serve (the API), worker (the defense), attack (over HTTP), and
stack up (all of it with Redis and Prometheus on loopback, without Docker).

Settings come from `DSCGUARD_*` environment variables (`service/deployment/settings.py`), keys included: they
are never taken on the command line, where other users of the machine could read them.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import ValidationError

from service.cli.options import CommandLineError, build_config, bundle_options, experiment_options, writable_output

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _settings(**updates):
    from service.deployment.settings import ServiceSettings

    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        raise SystemExit(_invalid_settings(exc)) from exc
    return settings.model_copy(update={k: v for k, v in updates.items() if v is not None})


def _invalid_settings(exc: ValidationError) -> str:
    """One line per wrong DSCGUARD_* variable (one line in all when one is wrong); secrets are never echoed."""
    lines = []
    for error in exc.errors():
        if error["type"] == "default_factory_not_called":  # a default computed from a field that failed above
            continue
        name = "DSCGUARD_" + "_".join(map(str, error["loc"])).upper()
        got = error.get("input")
        secret = error["loc"][0] in ("api_key", "admin_token")
        shown = "" if secret or isinstance(got, dict) or "input" not in error else f" (got {got!r})"
        lines.append(f"{name} {error['msg']}{shown}" if secret else f"{name}: {error['msg']}{shown}")
    if len(lines) == 1:
        return f"invalid DSCGUARD_* settings: {lines[0]}"
    return "invalid DSCGUARD_* settings:\n" + "\n".join(f"  {line}" for line in lines)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    settings.client_key("the API")

    # torch comes after OMP_WAIT_POLICY: service.cli.main.main sets it first
    from service.deployment.api.server import serve
    from service.deployment.metrics import MULTIPROCESS_ENV

    if args.workers > 1 and not os.environ.get(MULTIPROCESS_ENV):
        # several processes: prometheus_client's multiprocess mode, set before any worker imports it
        directory = tempfile.mkdtemp(prefix="dscguard-metrics-")
        os.environ[MULTIPROCESS_ENV] = directory
        atexit.register(shutil.rmtree, directory, True)
    serve(settings, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
          access_log=args.access_log)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # before torch loads: a wrong setting fails fast
    settings = _settings(worker_metrics_port=args.metrics_port, bundle=Path(args.bundle) if args.bundle else None)

    from service.core.bundle import BundleError
    from service.deployment.worker import WorkerError, run_worker

    _logging(args.log_level)
    try:
        run_worker(settings, max_batches=args.max_batches, idle_timeout=args.idle_timeout)
    except (WorkerError, BundleError) as exc:
        raise SystemExit(str(exc)) from exc
    return 0


def _endpoints(pairs: list[str]) -> dict[str, str]:
    """`--targets st=http://a:8000 gc=http://b:8000` -> {"st": ..., "gc": ...}, in the order given."""
    from service.core.strategy_registry import STRATEGY_NAMES

    endpoints: dict[str, str] = {}
    for pair in pairs:
        strategy, _, url = pair.partition("=")
        if strategy not in STRATEGY_NAMES or not url:
            raise CommandLineError(f"--targets {pair}: expected STRATEGY=URL with STRATEGY one of "
                                   f"{', '.join(STRATEGY_NAMES)}")
        if strategy in endpoints:
            raise CommandLineError(f"--targets: {strategy} is given twice")
        endpoints[strategy] = url
    return endpoints


def _seeds(values: list[str] | None) -> list[int] | None:
    """--seeds 0 1 2, or 0,1,2 (one word: what a compose file's variable can hold)."""
    if values is None:
        return None
    try:
        return [int(part) for value in values for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise CommandLineError(f"--seeds {' '.join(values)}: expected integers") from exc


def cmd_attack(args: argparse.Namespace) -> int:
    from attacker_sim.http_target import HttpTarget, TargetError, evaluate_target
    from service.cli.bundles import bundle_experiments

    config, prepare, subject = bundle_experiments(args, build_config(args))
    endpoints = _endpoints(args.targets) if args.targets else None
    seeds = _seeds(args.seeds)
    if args.out:
        writable_output(args.out)
    settings = _settings()
    key = settings.client_key("an attack over HTTP (and DSCGUARD_ADMIN_TOKEN for a white-box one)")
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    if endpoints is not None:
        return _attack_with_resets(args, config, prepare, subject, endpoints, seeds, key, admin)
    target = HttpTarget(args.target, key, admin, timeout_seconds=args.timeout)
    try:
        strategy = target.status()["strategy"]
        if strategy is None:
            raise TargetError("the service has not published a status yet (is the worker running?)")
        experiment = prepare(config) if prepare is not None else None
        evaluation = evaluate_target(config, target, strategy, scenarios=args.scenarios,
                                     progress=not args.no_progress, experiment=experiment, subject=subject)
    except TargetError as exc:
        raise SystemExit(f"attack against {args.target} failed: {exc}") from exc
    finally:
        target.close()
    _print_and_write(evaluation, args)
    return 0


def _attack_with_resets(args, config, prepare, subject, endpoints: dict[str, str], seeds, key: str,
                        admin: str | None) -> int:
    """`dscguard eval`'s runs, each against its strategy's service reset to the seed's starting state."""
    from attacker_sim.agreement import compare_results
    from attacker_sim.evaluation import evaluate
    from attacker_sim.http_target import HttpTarget, TargetError, reset_targets

    if admin is None:
        raise SystemExit("--targets resets each service before each run: set DSCGUARD_ADMIN_TOKEN")
    targets = {strategy: HttpTarget(url, key, admin, timeout_seconds=args.timeout)
               for strategy, url in endpoints.items()}
    try:
        evaluation = evaluate(config, strategies=list(endpoints), scenarios=args.scenarios, seeds=seeds,
                              progress=not args.no_progress, prepare=prepare, subject=subject,
                              targets=reset_targets(targets))
    except TargetError as exc:
        raise SystemExit(f"attack against {', '.join(f'{s}={u}' for s, u in endpoints.items())} failed: {exc}") \
            from exc
    finally:
        for target in targets.values():
            target.close()
    _print_and_write(evaluation, args)
    if args.compare:
        return _report_comparison(compare_results(Path(args.out) / "results.json" if args.out else _rows(evaluation),
                                                  args.compare, args.tolerance, args.rate_tolerance), args.compare,
                                  args.tolerance, args.rate_tolerance)
    return 0


def _print_and_write(evaluation, args: argparse.Namespace) -> None:
    """The eval table on stdout, and the reports under --out when given."""
    from attacker_sim.report import table_markdown, write_reports

    print(table_markdown(evaluation))
    if args.out:
        written = write_reports(evaluation, args.out, plots=not args.no_plots)
        print(f"wrote {', '.join(str(p) for p in written.values())} ({evaluation.seconds:.0f} s)")


def _rows(evaluation) -> dict:
    from attacker_sim.report import results_document

    return results_document(evaluation).model_dump(mode="json")


def _report_comparison(differences: list[str], other: str, tolerance: float, rate_tolerance: float) -> int:
    within = f"{tolerance:g} on accuracies, {rate_tolerance:g} on rates"
    if differences:
        print(f"differs from {other} beyond {within}:\n" + "\n".join(f"  {d}" for d in differences))
        return 1
    print(f"agrees with {other} within {within}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from attacker_sim.agreement import compare_results, max_difference

    print(f"largest difference: accuracies {max_difference(args.first, args.second):.4f}, rates "
          f"{max_difference(args.first, args.second, rates=True):.4f}")
    return _report_comparison(compare_results(args.first, args.second, args.tolerance, args.rate_tolerance),
                              args.second, args.tolerance, args.rate_tolerance)


def _tolerance_options(parser: argparse.ArgumentParser, flag: str) -> None:
    from attacker_sim.agreement import ACCURACY_TOLERANCE, RATE_TOLERANCE

    parser.add_argument("--tolerance", type=float, default=ACCURACY_TOLERANCE,
                        help=f"{flag}largest absolute difference of an accuracy, per seed and at every step of the "
                             f"traces (default {ACCURACY_TOLERANCE:g}; docs/deployment.md)")
    parser.add_argument("--rate-tolerance", type=float, default=RATE_TOLERANCE,
                        help=f"{flag}largest absolute difference of a flag or correction rate (default "
                             f"{RATE_TOLERANCE:g})")


def cmd_stack_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.deployment.stack import stack_up

    run_dir = Path(args.run_dir)
    # like the compose file's volumes: the stack's state lives in one place unless told otherwise
    settings = _settings(checkpoint_dir=None if os.environ.get("DSCGUARD_CHECKPOINT_DIR") else run_dir / "checkpoints")
    return stack_up(settings, run_dir, args.api_port, args.prometheus_port, args.scrape_interval, args.duration)


def add_service_commands(sub) -> None:
    """Add serve, worker, attack and stack to the `dscguard` subcommands."""

    p = sub.add_parser("serve", help="run the HTTP API under uvicorn (settings: DSCGUARD_* variables)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: loopback only; 0.0.0.0: every "
                                                       "interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the API")
    p.add_argument("--workers", type=int, default=1, help="uvicorn processes (>1: Prometheus multiprocess mode)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run the defense worker: stream -> DSC -> online model (SIGTERM: checkpoint, "
                                      "exit)")
    p.add_argument("--max-batches", type=int, help="stop after applying this many batches (default: never)")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a batch (default: "
                                                      "never)")
    p.add_argument("--bundle", help="serve this model bundle (a directory from `dscguard bundle create`) instead of "
                                    "the profile's burn-in (default: $DSCGUARD_BUNDLE, else the profile)")
    p.add_argument("--metrics-port", type=int, help="port of the worker's /metrics (default: "
                                                    "$DSCGUARD_WORKER_METRICS_PORT or 9101; 0: off)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the worker's log level")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("attack", help="the eval campaigns against a running service over HTTP; prints the eval table")
    experiment_options(p)
    bundle_options(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="one service's base URL, e.g. http://127.0.0.1:8000: its live model, never "
                                        "reset (each scenario starts where the last one left it)")
    where.add_argument("--targets", nargs="+", metavar="STRATEGY=URL",
                       help="one service per strategy (e.g. st=http://eval-api-st:8000): dscguard eval's runs, in its "
                            "order, each against its strategy's service reset (admin token) to the seed's starting "
                            "state")
    p.add_argument("--seeds", nargs="+", help="with --targets: seeds (default: the profile's, 0 1 2; 0,1,2 works too)")
    p.add_argument("--compare", metavar="RESULTS_JSON",
                   help="with --targets: compare with this results.json (e.g. dscguard eval's); exit 1 beyond "
                        "--tolerance")
    _tolerance_options(p, "with --compare: ")
    p.add_argument("--scenarios", nargs="+", default=["clean", "poison"], choices=("clean", "poison"),
                   help="clean: the clean oracle (no attacker); poison: the accumulative attack and its trigger")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one batch to be applied")
    p.add_argument("--out", help="also write results.json and report.md here (default: print the table only)")
    p.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("compare", help="whether two results.json (dscguard eval, dscguard attack --targets) agree "
                                       "within a tolerance; exit 1 when not")
    p.add_argument("first")
    p.add_argument("second")
    _tolerance_options(p, "")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("stack", help="the docker-compose stack without Docker: redis, worker, api, prometheus")
    stack = p.add_subparsers(dest="stack_command", required=True)
    p = stack.add_parser("up", help="start it all on 127.0.0.1 and print the URLs; Ctrl-C or SIGTERM stops it all")
    p.add_argument("--api-port", type=int, default=8000, help="TCP port of the API on 127.0.0.1")
    p.add_argument("--prometheus-port", type=int, default=9090, help="TCP port of Prometheus on 127.0.0.1")
    p.add_argument("--scrape-interval", help="Prometheus scrape and rule interval (default: the config's, 15s)")
    p.add_argument("--run-dir", default="runs/stack", help="logs, checkpoints, Prometheus data")
    p.add_argument("--duration", type=float, help="stop by itself after this many seconds (default: run until "
                                                  "Ctrl-C or SIGTERM)")
    p.set_defaults(func=cmd_stack_up)
