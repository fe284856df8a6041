"""Milliseconds per stream step of st, gc, at, dsc (frozen, rolling, gated) and guard on the same batches, in one run.

SmallCNN (or, with --model resnet18, the paper's ResNet-18), batches of 100 3x32x32 CIFAR-10 images (from
the data directory: ../shared/data or $DSCGUARD_DATA_DIR), CPU by default (--device cuda for a GPU), after a
short cached burn-in. dsc is calibrated on clean data.
Two streams: clean batches, and PGD-poisoned batches (error-maximising, radius --epsilon) crafted
against the start model (the guard's gate flags most of them, so the cost while shrinking is measured
too). Strategies take turns batch by batch so that machine noise hits them alike. The labels are the
arena's (`attacker_sim.arena.VARIANTS`); the rolling auxiliary's snapshots and promotions happen inside the
timed steps (a snapshot every 10 batches, promotions from batch 50 on: hence 60 timed batches).

    python benchmarks/step_cost.py --json step_cost.json
    python benchmarks/step_cost.py --device cuda --model resnet18 --json step_cost_gpu.json
    python benchmarks/step_cost.py --strategies st guard --probe-sizes 64 8 --warmup 150 --batches 300  # probe cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from pydantic import ValidationError

from attacker_sim.arena import VARIANTS
from attacker_sim.attacks import Budget, PGDDelusive
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.data import DatasetNotFoundError
from service.core.environment import environment
from service.core.experiment import Experiment

STRATEGIES = ("st", "gc", "at", "dsc", "dsc-rolling", "dsc-gate", "guard")
BOUNDS = (("dsc", "clean", 2.5), ("dsc-rolling", "clean", 1.5), ("dsc-gate", "clean", 1.5),
          ("dsc-gate", "poisoned", 2.5), ("guard", "clean", 1.5), ("guard", "poisoned", 2.5))


def _experiment(args) -> tuple[Experiment, str]:
    config = ExperimentConfig.from_profile(
        "cifar10-small", seed=args.seed, device=args.device,
        data={"burnin": 5000, "stream": 2000, "calibration": 500, "test": 1000},
        burnin={"epochs": 4, "checkpoint_every": 1, "auxiliary_epoch": 2},
        stream={"batch_size": args.batch_size}, model={"name": args.model},
    )
    try:
        return Experiment.prepare(config, progress=not args.no_progress), "cifar10"
    except DatasetNotFoundError as exc:
        raise SystemExit(f"step_cost needs CIFAR-10: {exc}") from exc


def _variants(probe_sizes) -> dict[str, dict]:
    """The arena's labels, and `guard-pN` for guard with an N-image lookahead probe (its cost grows with the probe).

    >>> _variants([64])["guard-p64"]
    {'name': 'guard', 'gate_probe_samples': 64}
    """
    return {**VARIANTS, **{f"guard-p{n}": {**VARIANTS["guard"], "gate_probe_samples": n} for n in probe_sizes}}


def _time_streams(experiment: Experiment, batches, warmup: int, strategies: dict[str, dict]) -> dict:
    learners = {name: experiment.new_learner(experiment.config.strategy.model_copy(update=update))
                for name, update in strategies.items()}
    times = {name: [] for name in strategies}
    flagged = {name: 0 for name in strategies}
    samples = 0
    for index, (x, y) in enumerate(batches):
        for name, learner in learners.items():
            started = time.perf_counter()
            report = learner.step(x, y)
            if experiment.device.type == "cuda":  # kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(experiment.device)
            elapsed = time.perf_counter() - started
            if index >= warmup:
                times[name].append(elapsed)
                flagged[name] += report.flagged_count
        samples += len(x) if index >= warmup else 0
    result = {}
    for name in strategies:
        ms = [1000 * t for t in times[name]]
        result[name] = {"ms_per_step_mean": statistics.fmean(ms), "ms_per_step_median": statistics.median(ms),
                        "ms_per_step_std": statistics.pstdev(ms), "flagged_rate": flagged[name] / samples}
    st = result["st"]["ms_per_step_mean"]
    for name in strategies:
        result[name]["ratio_to_st"] = result[name]["ms_per_step_mean"] / st
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per stream")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=8 / 255, help="PGD poison radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the ratios are to st on this device)")
    parser.add_argument("--model", choices=("smallcnn", "resnet18"), default="smallcnn",
                        help="the learner's model (resnet18: the paper profile's, for a GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--strategies", nargs="+", choices=list(VARIANTS), default=list(STRATEGIES),
                        help="arena labels to time, st among them (the ratios are to st)")
    parser.add_argument("--probe-sizes", type=int, nargs="+", default=[], metavar="N",
                        help="also time guard with an N-image lookahead probe (label guard-pN; the default is 256)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for size in args.probe_sizes:  # the config's own bound on gate_probe_samples, before any burn-in
        try:
            StrategyConfig(gate_probe_samples=size)
        except ValidationError as exc:
            parser.error(f"--probe-sizes: {size} is not a strategy.gate_probe_samples: {exc.errors()[0]['msg']}")
    if "st" not in args.strategies:
        parser.error("--strategies must include st: every ratio is to st")
    variants = _variants(args.probe_sizes)
    strategies = {name: variants[name] for name in [*args.strategies, *(f"guard-p{n}" for n in args.probe_sizes)]}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    experiment, dataset = _experiment(args)
    total = args.batches + args.warmup
    clean = list(experiment.stream_batches(total, seed=args.seed))
    start_model = experiment.burnin.model.eval()
    pgd = PGDDelusive(Budget(epsilon=args.epsilon, steps=10, step_size=args.epsilon / 4))
    poisoned = [(pgd(start_model, x, y), y) for x, y in clean]  # crafted on the model's device, handed back on the CPU
    calibration = experiment.calibration_for("kl")
    results = {
        "benchmark": "step_cost",
        "config": {"model": args.model, "dataset": dataset, "batch_size": args.batch_size, "batches": args.batches,
                   "warmup": args.warmup, "poison": f"pgd eps={args.epsilon:.4f} steps=10", "seed": args.seed,
                   "strategy": experiment.config.strategy.model_dump(), "variants": strategies},
        "calibration": calibration.to_dict(),
        "environment": {**environment(), "device": str(experiment.device)},
        "clean": _time_streams(experiment, clean, args.warmup, strategies),
        "poisoned": _time_streams(experiment, poisoned, args.warmup, strategies),
    }
    print(f"{'stream':<9}{'strategy':<12}{'ms/step':>9}{'ratio':>7}{'flagged':>9}")
    for stream in ("clean", "poisoned"):
        for name in strategies:
            r = results[stream][name]
            print(f"{stream:<9}{name:<12}{r['ms_per_step_mean']:9.1f}{r['ratio_to_st']:7.2f}{r['flagged_rate']:9.1%}")
    results["target"] = {}
    for name, stream, bound in [b for b in BOUNDS if b[0] in strategies]:
        ratio = results[stream][name]["ratio_to_st"]
        results["target"][f"{name}_over_st_{stream}"] = {"ratio": ratio, "bound": bound, "met": ratio <= bound}
        print(f"{name}/st on the {stream} stream: {ratio:.2f} (target <= {bound}: "
              f"{'met' if ratio <= bound else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
