"""Shared fixtures: a tiny random-weight checkpoint and a tiny synthetic dataset."""

from __future__ import annotations

import os

import pytest
import torch

from model.checkpoint import MAD, save_checkpoint
from model.config import get_preset
from model.data.synth import write_synthetic_dataset
from model.tokenizer import CaptionTokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_CAPTIONS = [
    "a red circle to the left of a blue square",
    "two green stars above a person",
    "a yellow hexagon next to a purple triangle",
    "three orange squares below a red star",
] * 10


def micro_config(**overrides):
    """Smaller than the tiny preset: for fast tests of shapes and plumbing."""
    values = dict(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=2, ffn_dim=64,
                  image_size=(96, 96), num_bins=96, num_slots=6, caption_len=12)
    values.update(overrides)
    return get_preset("tiny", **values)


@pytest.fixture(scope="session")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(TINY_CAPTIONS, 64)


@pytest.fixture(scope="session")
def micro_model(tokenizer) -> MAD:
    torch.manual_seed(0)
    return MAD.build(micro_config(), tokenizer)


@pytest.fixture(scope="session")
def micro_checkpoint(micro_model, tmp_path_factory):
    """A saved random-weight micro model (what service and export tests load)."""
    return save_checkpoint(micro_model, tmp_path_factory.mktemp("ckpt") / "micro", step=0)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=8, val=4, seed=0)
    return root
