"""Helpers the tests share: micro model settings, test images, free ports and the real
service (uvicorn on loopback, in its own thread). Fixtures built on them live in conftest.py."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import MAD
from model.config import get_preset
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.synth import render_synthetic_image
from model.inference_io import Result
from model.losses import sequence_loss
from service.app import create_app
from service.server import DrainingServer, uvicorn_options
from service.settings import Settings
from service.state import ServiceState

ALL_TASKS = ("detection", "segmentation", "keypoints", "caption")
TINY_CAPTIONS = [
    "a red circle to the left of a blue square",
    "two green stars above a person",
    "a yellow hexagon next to a purple triangle",
    "three orange squares below a red star",
] * 10


# A micro model's ModelConfig overrides for tests that train or serve it end to end.
MICRO_OVERRIDES = {
    "d_model": 32,
    "n_heads": 4,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "ffn_dim": 64,
    "image_size": [96, 96],
    "num_bins": 96,
    "num_slots": 8,
    "caption_len": 12,
}


def micro_config(**overrides):
    """Smaller than the tiny preset: for fast tests of shapes and plumbing."""
    values = dict(
        d_model=32,
        n_heads=4,
        encoder_layers=1,
        decoder_layers=2,
        ffn_dim=64,
        image_size=(96, 96),
        num_bins=96,
        num_slots=6,
        caption_len=12,
    )
    values.update(overrides)
    return get_preset("tiny", **values)


def fit_detection_decoder(
    mad: MAD, data: Path, steps: int = 120, images: int = 8, lr: float = 5e-3
) -> None:
    """Fit a random-weight model's decoder to the detection sequences of the first `images`
    training images of `data` (backbone and encoder frozen, so they are encoded once: a few
    seconds for the micro model). Untrained, every slot decodes one shared coordinate bin,
    i.e. boxes without area, which decoding drops; after this, most boxes have an extent."""
    network, codec = mad.required_network().eval(), mad.codecs["detection"]
    dataset = CocoMultiTaskDataset(data, "train2017")
    samples = [dataset[i] for i in range(min(images, len(dataset)))]
    pixels, pads, targets = CanvasCollate(mad.config.image_size)(samples)
    with torch.no_grad():
        memory = network.encode(pixels, pads)
    trained = ("decoder.", "final_norm.", "token_embedding.", "seq_pos.", "head.")
    params = [p for name, p in network.named_parameters() if name.startswith(trained)]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        seqs = codec.training_sequences(targets, generator)
        logits = network.decode(
            memory, seqs.inputs, seqs.image_index, codec.vocab_slice(), all_layers=True
        )
        loss = sequence_loss(logits, seqs, codec)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.zero_grad(set_to_none=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started in a subprocess)."""
    [port] = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on 127.0.0.1 right now: all are held until all are
    chosen, so no two are the same."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    server: DrainingServer
    thread: threading.Thread

    @property
    def state(self) -> ServiceState:
        return self.app.state.service

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


@contextmanager
def running_server(
    settings: Settings, start_timeout_s: float = 60.0, ready: bool = True
) -> Iterator[RunningServer]:
    """Serve `settings` on a free 127.0.0.1 port until the block ends; from when its model is
    ready, or (ready=False) from when it listens."""
    app = create_app(settings)
    # Bind here and hand the socket over: no race for the port between probe and bind.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = uvicorn_options(settings)
    if "keep_alive_timeout_s" not in settings.model_fields_set:
        options["timeout_keep_alive"] = 30  # module-scoped clients keep idle connections
    config = uvicorn.Config(app, **{**options, "log_config": None})
    server = DrainingServer(config, app.state.service)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    give_up = time.monotonic() + start_timeout_s
    state: ServiceState = app.state.service
    # It listens at once and loads the model meanwhile: wait until it is ready.
    while not (server.started and (state.ready or not ready)):
        if not thread.is_alive() or time.monotonic() > give_up or state.startup_error:
            server.should_exit = True
            thread.join(start_timeout_s)
            sock.close()
            raise RuntimeError(f"the test server did not start: {state.startup_error}")
        time.sleep(0.02)
    running = RunningServer(f"http://127.0.0.1:{port}", app, server, thread)
    try:
        yield running
    finally:
        running.stop()
        sock.close()


def scene_image(width: int = 160, height: int = 120, mode: str = "RGB") -> Image.Image:
    """A small picture with a few shapes (content matters little to a random model)."""
    image = Image.new("RGB", (width, height), (240, 236, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse([10, 10, 60, 60], fill=(200, 30, 30))
    draw.rectangle([80, 30, 140, 90], fill=(30, 60, 200))
    draw.line([(40, 70), (40, 110), (25, 118)], fill=(0, 0, 0), width=4)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """`n` images of synthetic world v1 (shapes and persons), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(render_synthetic_image(rng, world="v1")[0]) for _ in range(n)]


def metric_samples(client: httpx.Client) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict[tuple, float], after: dict[tuple, float], name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def until(
    condition: Callable[[], object], what: str, timeout_s: float = 20.0, every_s: float = 0.01
) -> None:
    """Wait for `condition` (polled every `every_s`); fail with `what` after `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, what
        time.sleep(every_s)


class Recorder:
    """A Progress that records what the pipeline reports, and cancels on demand."""

    def __init__(self, partials: bool = True, cancel_after: int | None = None):
        self.partials = partials
        self.cancel_after = cancel_after  # cancel once this many partials arrived
        self.events: list[tuple[str, int, Result]] = []

    def cancelled(self) -> bool:
        seen = sum(kind == "partial" for kind, _, _ in self.events)
        return self.cancel_after is not None and seen >= self.cancel_after

    def partial(self, result: Result, round: int) -> None:
        self.events.append(("partial", round, result))

    def finished(self, result: Result) -> None:
        self.events.append(("finished", -1, result))
