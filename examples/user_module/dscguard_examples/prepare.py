"""Train an example network briefly and write the pieces of its bundle: `online.safetensors` (the last epoch),
`auxiliary.safetensors` (the middle epoch), `trusted.npz` (the trusted clean set) and `data.npz` (held-out samples
for `dscguard eval/attack --bundle ... --data`), each part disjoint from the training data.

    python -m dscguard_examples.prepare digits --out runs/user_module
    python -m dscguard_examples.prepare torchvision --out runs/torchvision
    python -m dscguard_examples.prepare tabular --out runs/tabular

Everything is offline: scikit-learn ships the digits and breast-cancer datasets inside its package.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from dscguard_examples.nets import digits_cnn, tabular_mlp

SEED = 0


def _digits(channels: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels 0..16 -> [0, 1]
    if size != 8:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return x.repeat(1, channels, 1, 1), torch.tensor(digits.target)


def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor, list[list[float]], list[str]]:
    """The 30 features divided by each feature's largest value in the dataset (all are non-negative): inputs in
    [0, 1], and each feature's bounds are its smallest and largest value, scaled alike."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    raw = torch.tensor(data.data, dtype=torch.float32)
    x = raw / raw.max(0).values
    bounds = torch.stack([x.min(0).values, x.max(0).values], 1)
    # rounded outwards, so that every sample stays inside its bounds
    bounds = [[math.floor(float(lo) * 1e6) / 1e6, math.ceil(float(hi) * 1e6) / 1e6] for lo, hi in bounds]
    return x, torch.tensor(data.target), bounds, [str(name) for name in data.target_names]


def _resnet18(classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model("resnet18", weights=None, num_classes=classes)


EXAMPLES = {
    # name: data, network, epochs, learning rate, trusted and held-out sizes
    "digits": {"data": _digits, "net": lambda: digits_cnn(10), "epochs": 10, "lr": 0.05, "trusted": 200,
               "held_out": 800},
    "torchvision": {"data": lambda: _digits(3, 16), "net": lambda: _resnet18(10), "epochs": 12, "lr": 0.05,
                    "trusted": 200, "held_out": 800},
    "tabular": {"data": None, "net": lambda: tabular_mlp(30, 2), "epochs": 60, "lr": 0.05, "trusted": 100,
                "held_out": 300},
}


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> tuple[nn.Module, nn.Module]:
    """SGD (momentum 0.9, batches of 32); returns (the last epoch, a copy taken at the middle epoch)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(SEED)
    middle = None
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
        if epoch + 1 == epochs // 2:
            middle = copy.deepcopy(net).eval()
    return net.eval(), middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=list(EXAMPLES))
    parser.add_argument("--out", required=True, help="directory for the weights, trusted.npz, data.npz")
    args = parser.parse_args()
    spec = EXAMPLES[args.example]
    torch.manual_seed(SEED)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if args.example == "tabular":
        x, y, bounds, names = _breast_cancer()
        info = {"class_names": names}
        (out / "feature_bounds.json").write_text(json.dumps(bounds))  # for `bundle create --feature-bounds`
    else:
        x, y = spec["data"]()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    trusted, held_out = order[: spec["trusted"]], order[spec["trusted"] : spec["trusted"] + spec["held_out"]]
    training = order[spec["trusted"] + spec["held_out"] :]
    # the normalisation the bundle declares (images: per channel, from the training part)
    if x.ndim == 4:
        info["mean"] = [round(float(v), 6) for v in x[training].mean((0, 2, 3))]
        info["std"] = [round(float(v), 6) for v in x[training].std((0, 2, 3))]
    net = spec["net"]()
    normalised = _Normalise(net, info.get("mean"), info.get("std"))
    online, auxiliary = train(normalised, x[training], y[training], spec["epochs"], spec["lr"])
    save_file({k: v.contiguous() for k, v in online.net.state_dict().items()}, out / "online.safetensors")
    save_file({k: v.contiguous() for k, v in auxiliary.net.state_dict().items()}, out / "auxiliary.safetensors")
    np.savez(out / "trusted.npz", x=x[trusted].numpy(), y=y[trusted].numpy())
    np.savez(out / "data.npz", x=x[held_out].numpy(), y=y[held_out].numpy())
    with torch.no_grad():
        accuracy = float((online(x[held_out]).argmax(1) == y[held_out]).float().mean())
    info.update(training_samples=len(training), held_out_accuracy=round(accuracy, 4))
    (out / "prepared.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out}: online/auxiliary.safetensors, trusted.npz ({len(trusted)}), data.npz ({len(held_out)}); "
          f"{len(training)} training samples, held-out accuracy {accuracy:.4f}")
    if "mean" in info:
        print(f"normalisation: --mean {' '.join(map(str, info['mean']))} --std {' '.join(map(str, info['std']))}")


class _Normalise(nn.Module):
    """Trains the network behind the normalisation the bundle will declare (the bundle wraps it the same way)."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(shape) if mean else torch.zeros(1))
        self.register_buffer("std", torch.tensor(std).view(shape) if std else torch.ones(1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


if __name__ == "__main__":
    main()
