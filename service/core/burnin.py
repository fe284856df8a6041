"""Burn-in: train on trusted data, keep checkpoints, cache the result by a hash of the config.

The auxiliary model of the defense is one of the burn-in checkpoints (the paper: epoch 20 of 40),
the online model starts from the last one. A second run with the same config loads the cached
checkpoints instead of training again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch.nn import functional as F
from tqdm.auto import tqdm

from service.core.atomic import atomic_write_bytes, atomic_write_text
from service.core.config import ExperimentConfig
from service.core.data import ArrayDataset
from service.core.device import model_device
from service.core.models import Normalized, build_model
from service.core.models.inference import logits_in_chunks
from service.core.tied_tensors import storable


@dataclass
class BurnInResult:
    """The trained online model, the auxiliary checkpoint, and how they were obtained."""

    model: Normalized
    auxiliary: Normalized
    model_spec: dict
    history: list[dict]
    cached: bool
    directory: Path


def model_spec_for(config: ExperimentConfig, data: ArrayDataset) -> dict:
    """What `build_model` needs to rebuild this experiment's network, with normalisation stats."""
    x = torch.from_numpy(data.x).float() / 255.0
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return {"name": config.model.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "mean": [round(v, 6) for v in mean], "std": [round(v, 6) for v in std], **config.model.options}


def burn_in(config: ExperimentConfig, data: ArrayDataset, cache_dir: Path, test: ArrayDataset | None = None,
            device: torch.device | str = "cpu", progress: bool = True) -> BurnInResult:
    """Train (or load from cache) the burn-in model for `config` on `data`."""
    cfg = config.burnin
    directory = Path(cache_dir) / "burnin" / config.burnin_fingerprint()
    done_marker = directory / "history.json"
    spec = model_spec_for(config, data)
    if done_marker.is_file():
        history = json.loads(done_marker.read_text())
        model = _load(directory, cfg.epochs, spec, device)
        auxiliary = _load(directory, cfg.auxiliary_epoch, spec, device)
        return BurnInResult(model, auxiliary, spec, history, True, directory)

    torch.manual_seed(config.seed)
    model = build_model(**spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    x_all, y_all = data.tensors()
    generator = torch.Generator().manual_seed(config.seed)
    directory.mkdir(parents=True, exist_ok=True)
    _save(directory, 0, model)
    history: list[dict] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"burn-in {config.model.name}/{config.data.dataset}",
               disable=not progress, unit="epoch")
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        scheduler.step()
        record = {"epoch": epoch, "loss": total_loss / len(order), "seconds": time.perf_counter() - started}
        if test is not None:
            record["test_accuracy"] = _accuracy(model, test, device)
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            _save(directory, epoch, model)
    # written last: its presence marks a complete cache entry
    atomic_write_text(done_marker, json.dumps(history, indent=2))
    auxiliary = _load(directory, cfg.auxiliary_epoch, spec, device)
    return BurnInResult(model, auxiliary, spec, history, False, directory)


def _accuracy(model, data: ArrayDataset, device) -> float:
    x, y = data.tensors()
    return int((logits_in_chunks(model, x, 1000, device).argmax(1).cpu() == y).sum()) / len(x)


def _save(directory: Path, epoch: int, model) -> None:
    """The epoch's weights, written atomically and fsynced (`service/core/atomic.py`)."""
    atomic_write_bytes(directory / f"epoch_{epoch:04d}.safetensors", save(storable(model.state_dict())))


def load_checkpoint_epoch(result: BurnInResult, epoch: int) -> Normalized:
    """The burn-in model as it was after `epoch` (a kept checkpoint), e.g. a black-box surrogate."""
    path = result.directory / f"epoch_{epoch:04d}.safetensors"
    if not path.is_file():
        kept = sorted(int(p.stem.split("_")[1]) for p in result.directory.glob("epoch_*.safetensors"))
        raise ValueError(f"no burn-in checkpoint for epoch {epoch}; kept epochs: {kept}")
    return _load(result.directory, epoch, result.model_spec, model_device(result.model))


def _load(directory: Path, epoch: int, spec: dict, device) -> Normalized:
    model = build_model(**spec)
    model.load_state_dict(load_file(directory / f"epoch_{epoch:04d}.safetensors"))
    return model.to(device)
