"""Shared fixtures: a tiny, barely trained checkpoint, a tiny synthetic dataset, and the
real service with an HTTP client for it.

The service fixtures serve `server_settings`; a test module that needs other settings
(an API key, upload limits) overrides that one fixture.
"""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
import torch

from model.checkpoint import MAD, save_checkpoint
from model.data.synth import write_synthetic_dataset
from model.tokenizer import CaptionTokenizer
from service.settings import Settings
from tests.helpers import TINY_CAPTIONS, fit_detection_decoder, micro_config, running_server

torch.set_num_threads(1)  # a training job shares this machine


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same global random state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(TINY_CAPTIONS, 64)


@pytest.fixture(scope="session")
def micro_model(tokenizer, synth_data) -> MAD:
    """Shared by many tests: random weights but a decoder fitted to a few images' detection
    sequences, so its boxes have width and height; in eval mode from the start, so no test
    depends on another having switched it."""
    torch.manual_seed(0)
    mad = MAD.build(micro_config(), tokenizer)
    fit_detection_decoder(mad, synth_data)
    mad.required_network().eval()
    return mad


@pytest.fixture(scope="session")
def micro_checkpoint(micro_model, tmp_path_factory):
    """A saved random-weight micro model (what service and export tests load)."""
    return save_checkpoint(micro_model, tmp_path_factory.mktemp("ckpt") / "micro", step=0)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=8, val=4, seed=0)
    return root


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint) -> Settings:
    """What `server` serves; override in a test module for other settings."""
    return Settings(checkpoint=micro_checkpoint, batch_delay_ms=2)


@pytest.fixture(scope="module")
def server(server_settings):
    """The real service on a free loopback port, one per test module."""
    with running_server(server_settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server, server_settings):
    """An httpx client of `server`, sending the API key when the settings have one."""
    key = server_settings.api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(client) -> str:
    """The served model's name, as GET /v1/model gives it (the /v2 routes' {model_name})."""
    return client.get("/v1/model").json()["name"]
