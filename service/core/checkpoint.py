"""Checkpoints as a directory of safetensors + JSON, written atomically; no pickle anywhere.

A checkpoint is `tensors.safetensors` (named tensors) and `meta.json` (everything else). It is
written into a temporary sibling directory, fsynced, and renamed into place, so a crash mid-write
never leaves a half checkpoint under the final name, and a checkpoint that exists survives a power
cut (the worker acknowledges stream entries once a checkpoint holds them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.core.atomic import fsync_path
from service.core.tied_tensors import storable

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` and `meta` to `directory`, replacing it atomically if it exists."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(storable(tensors), staging / TENSORS_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for path in (staging / TENSORS_FILE, staging / META_FILE, staging):  # on disk before the rename
            fsync_path(path)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(directory.parent)  # the rename itself
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; raise CheckpointError naming the file when anything is wrong."""
    directory = Path(directory)
    tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {tensors_path} is corrupt: {exc}") from exc
    return tensors, load_meta(directory)


def load_meta(directory: str | Path) -> dict:
    """A checkpoint's `meta.json` alone (no tensors read); CheckpointError when missing or not JSON."""
    meta_path = Path(directory) / META_FILE
    try:
        return json.loads(meta_path.read_text())
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {meta_path} cannot be read: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {meta_path} is not valid JSON: {exc}") from exc


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix.`, with the prefix removed."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
