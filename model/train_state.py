"""Optimizer state for exact resumption, kept beside (not inside) the model checkpoint.

Tensors go to `train_state.safetensors`, everything else to `train_state.json`: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

TENSORS, META = "train_state.safetensors", "train_state.json"


def train_state_files(
    optimizer: torch.optim.Optimizer, step: int, extra: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """The optimizer's state after `step` steps, plus `extra` (JSON) -> file name -> bytes,
    to be saved with the checkpoint (model.checkpoint.save_checkpoint's extra_files)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    meta = {
        "step": step,
        "param_groups": state["param_groups"],
        "scalars": scalars,
        **(extra or {}),
    }
    return {TENSORS: save(tensors), META: json.dumps(meta, indent=1).encode()}


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer in place -> the JSON metadata (step, ...)."""
    meta = json.loads((Path(directory) / META).read_text())
    tensors = load_file(Path(directory) / TENSORS)
    state: dict[int, dict] = {}
    for name, value in {**tensors, **meta["scalars"]}.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def train_state_step(directory: Path) -> int:
    """The step the training state in `directory` was saved at."""
    return int(json.loads((Path(directory) / META).read_text())["step"])


def has_train_state(directory: Path) -> bool:
    return (Path(directory) / META).is_file() and (Path(directory) / TENSORS).is_file()
