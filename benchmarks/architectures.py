"""guard on the networks users bring: each architecture below is trained briefly on scikit-learn's digits, bundled as
a user's factory (`architectures:NAME`), and measured by `dscguard eval --bundle` (st and guard, seeds 0, 1, 2), so
that an architecture the product breaks on shows up as an error row instead of in a user's deployment.

Each network is trained behind the training part's normalisation, which its bundle declares (`model.normalization`),
as the user-module example's is. The catalog holds what the built-in profiles lack: LayerNorm and GroupNorm,
BatchNorm with a frozen layer, with a cumulative average or without running statistics, tied weights, a layer applied
twice, a parameter outside the forward, attention (a tiny ViT) and a torchvision MobileNetV3. Each took a probe of the
eighteenth session to a fault or a clear refusal (docs/results.md).

    python benchmarks/architectures.py --json architectures.json
    python benchmarks/architectures.py --only tiny_vit mlp_tied --epochs 5
    python benchmarks/architectures.py --set strategy.gate_first_interval=10   # any `dscguard eval --set`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.cli import main as cli
from service.core.bundle import BundleManifest, create_bundle
from service.core.data.digits import load_sklearn_digits
from service.core.models import Normalized

TRUSTED, HELD_OUT = 200, 800  # the rest of the 1,797 digits trains the network


class _Rows(nn.Module):
    """The image's rows as tokens (8 of 8 features) for the attention model."""

    def forward(self, x):
        return x.flatten(1, 2)


class _TinyViT(nn.Module):
    def __init__(self, classes: int, dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)  # 16 patches of 2x2
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1,
                                                                        batch_first=True), 2)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens).mean(1)))


class _Tied(nn.Module):
    """Two layers that share one weight matrix (two names in the state dict, one tensor)."""

    def __init__(self, classes: int):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, classes)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.head(self.second(self.first(x.flatten(1)).relu()).relu())


class _Twice(nn.Module):
    """One layer applied twice."""

    def __init__(self, classes: int):
        super().__init__()
        self.inp, self.hidden, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.hidden(self.hidden(self.inp(x.flatten(1)).relu()).relu()).relu())


class _SpareHead(nn.Module):
    """A second head the forward never uses (its author trains it elsewhere)."""

    def __init__(self, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.head, self.spare = nn.Linear(64, classes), nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.body(x))


class _FrozenConv(nn.Module):
    """A CNN with BatchNorm whose first convolution the user froze (its BatchNorm still tracks)."""

    def __init__(self, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(128, classes)
        self.body[0].requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x))


def _mlp(classes: int, norm: nn.Module, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, classes))


def _mobilenet(classes: int) -> nn.Module:
    import torchvision

    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=classes)
    net.features[0][0] = nn.Conv2d(1, 16, 3, stride=1, padding=1, bias=False)  # grey 8x8 digits
    return net


# name: (factory(classes), what it holds); a bundle names each as `architectures:NAME`
CATALOG = {
    "cnn": (lambda c: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                    nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, c)),
            "a plain CNN (the reference)"),
    "mlp_layernorm": (lambda c: _mlp(c, nn.LayerNorm(64), dropout=0.2), "LayerNorm and dropout"),
    "cnn_groupnorm": (lambda c: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                              nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, c)),
                      "GroupNorm"),
    "cnn_batchnorm_frozen": (_FrozenConv, "BatchNorm, the first convolution frozen"),
    "mlp_batchnorm_cumulative": (lambda c: _mlp(c, nn.BatchNorm1d(64, momentum=None)),
                                 "BatchNorm with a cumulative average (momentum None)"),
    "mlp_batchnorm_untracked": (lambda c: _mlp(c, nn.BatchNorm1d(64, track_running_stats=False)),
                                "BatchNorm without running statistics"),
    "mlp_tied": (_Tied, "tied weights"),
    "mlp_twice": (_Twice, "one layer applied twice"),
    "mlp_spare_head": (_SpareHead, "a parameter outside the forward"),
    "tiny_vit": (_TinyViT, "attention (a 2-layer ViT on 2x2 patches)"),
    "mobilenet_v3_small": (_mobilenet, "torchvision's MobileNetV3 (hardswish, squeeze-excitation, BatchNorm)"),
}


def __getattr__(name: str):
    """`architectures:NAME` as a bundle's factory: NAME(num_classes) builds the catalog's network."""
    if name in CATALOG:
        return lambda num_classes=10: CATALOG[name][0](num_classes)
    raise AttributeError(name)


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple[nn.Module, nn.Module]:
    """The user's training, as the user-module example trains its network (examples/user_module, `prepare.train`:
    SGD at lr 0.05, momentum 0.9, batches of 32, seed 0): the last epoch, and a copy of the middle one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "user_module"))
    from dscguard_examples.prepare import train

    return train(net, x, y, epochs, lr=0.05)


def _summary(results: dict) -> dict:
    """What the table shows, from `dscguard eval`'s results.json (accuracies in percent)."""
    rows = {(row["strategy"], row["scenario"]): row for row in results["rows"]}

    def pct(strategy: str, scenario: str, field: str):
        value = (rows.get((strategy, scenario)) or {}).get(field)
        return None if value is None else round(100 * value["mean"], 1)

    return {f"{s}_{name}": pct(s, scenario, field) for s in ("st", "guard")
            for name, scenario, field in (("clean_final", "clean", "clean_final_acc"),
                                          ("after_trigger", "poison", "trigger_acc"),
                                          ("clean_flagged", "clean", "flagged_rate"),
                                          ("poisons_flagged", "poison", "flagged_rate"))}


def run_one(name: str, epochs: int, work: Path, sets: list[str]) -> dict:
    torch.manual_seed(0)
    x, y = load_sklearn_digits().tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    trusted, held = order[:TRUSTED], order[TRUSTED:TRUSTED + HELD_OUT]
    training = order[TRUSTED + HELD_OUT:]
    # trained behind the training part's normalisation, which the bundle declares (the user-module example's way)
    mean, std = [round(float(x[training].mean()), 6)], [round(float(x[training].std()), 6)]
    online, auxiliary = _train(Normalized(__getattr__(name)(), mean, std), x[training], y[training], epochs)
    with torch.no_grad():
        trained = float((online(x[held]).argmax(1) == y[held]).float().mean())
    manifest = BundleManifest(schema_version=1, model={"architecture": f"architectures:{name}",
                                                       "normalization": {"mean": mean, "std": std}},
                              input={"shape": [1, 8, 8], "num_classes": 10})
    bundle = create_bundle(work / name / "bundle", manifest, online.net, (x[trusted], y[trusted]),
                           auxiliary=auxiliary.net)
    np.savez(work / name / "data.npz", x=x[held].numpy(), y=y[held].numpy())
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # eval's own tables go with the progress; stdout is the summary
        code = cli(["eval", "--bundle", str(bundle), "--data", str(work / name / "data.npz"), "--strategies", "st",
                    "guard", "--no-progress", "--out", str(work / name / "report"),
                    *[arg for value in sets for arg in ("--set", value)]])
    row = {"architecture": name, "holds": CATALOG[name][1], "trained": round(100 * trained, 1),
           "seconds": round(time.perf_counter() - started, 1), "exit_code": code}
    results = work / name / "report" / "results.json"
    if code == 0 and results.exists():
        row.update(_summary(json.loads(results.read_text())))
    return row


def _cell(value, unit: str = "") -> str:
    return "–" if value is None else f"{value}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CATALOG), help="these architectures (default: all)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs on the digits (default 10, at least 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to dscguard eval (e.g. strategy.gate_first_interval=10); repeatable")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.epochs < 2:  # the auxiliary is the middle epoch's
        parser.error(f"--epochs must be >= 2, got {args.epochs}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dscguard-architectures-") as work:
        for name in args.only or list(CATALOG):
            print(f"== {name}: {CATALOG[name][1]}", file=sys.stderr, flush=True)
            rows.append(run_one(name, args.epochs, Path(work), args.set))
    print("| architecture | holds | trained | st: clean final / after trigger | guard: clean final / after trigger | "
          "guard flags: clean / poisons | eval |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        status = "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']} (the error is above)"
        print(f"| {r['architecture']} | {r['holds']} | {r['trained']} | {_cell(r.get('st_clean_final'))} / "
              f"{_cell(r.get('st_after_trigger'))} | {_cell(r.get('guard_clean_final'))} / "
              f"{_cell(r.get('guard_after_trigger'))} | {_cell(r.get('guard_clean_flagged'), '%')} / "
              f"{_cell(r.get('guard_poisons_flagged'), '%')} | {status} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
