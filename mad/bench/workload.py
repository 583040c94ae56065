"""What is benchmarked: the checkpoint, the input image and the detection prompts.

Timing depends on shapes, not on weights, so a preset with random weights is a fair stand-in
for a trained model (saved to a temporary checkpoint, because ONNX export and `mad serve`
load checkpoints from disk). The one thing weights do decide is how many detections pass the
score threshold, which sets the work of segmentation and keypoints; so those tasks are
prompted here with an explicit number of boxes instead.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.checkpoint import CONFIG, MAD, load_checkpoint, save_checkpoint
from model.codecs import DecodeContext
from model.config import get_preset
from model.tokenizer import CaptionTokenizer

BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "mad-tiny"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def parse_size(text: str) -> tuple[int, int]:
    """ "800x1333" -> (800, 1333) (height x width)."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.strip().isdigit() or not width.strip().isdigit():
        raise ValueError(f"image size must be HxW, e.g. 800x1333, not {text!r}")
    return int(height), int(width)


def word(i: int) -> str:
    """A distinct lowercase word per integer (base 26, at least two letters)."""
    out = ""
    i += 26
    while i:
        i, r = divmod(i, 26)
        out = LETTERS[r] + out
    return out


def random_tokenizer(vocab_size: int) -> CaptionTokenizer:
    """A word tokenizer with about `vocab_size` pieces, so the caption head has the preset's
    width (the caption slice of the vocabulary is the tokenizer's size)."""
    words = [word(i) for i in range(max(vocab_size - 2, 8))]  # pad and unk take two ids
    sentences = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return CaptionTokenizer.train(sentences, vocab_size)


def resolve_checkpoint(preset: str | None, checkpoint: Path | None) -> Path | None:
    """The checkpoint to load: the one given, else the bundled model when no preset was
    asked for; None means a random-weight preset."""
    if checkpoint is not None:
        return checkpoint
    if preset is None and (BUNDLED_CHECKPOINT / CONFIG).is_file():
        return BUNDLED_CHECKPOINT
    return None


def prepare_checkpoint(
    preset: str | None, checkpoint: Path | None, image_size: tuple[int, int] | None, workdir: Path
) -> tuple[Path, str]:
    """-> (checkpoint dir whose canvas is `image_size`, where it came from).

    A given checkpoint with another canvas is copied with its config changed (the canvas is
    only the letterbox size; every layer accepts any size), so every consumer (this process,
    the ONNX export, the `mad serve` subprocess) sees the same model and size."""
    source = resolve_checkpoint(preset, checkpoint)
    if source is None:
        torch.manual_seed(0)
        config = get_preset(preset or "tiny")
        if image_size is not None:
            config.image_size = image_size
        mad = MAD.build(config, random_tokenizer(config.text_vocab_size))
        out = save_checkpoint(mad, workdir / f"random-{config.name}", step=0)
        return out, f"random weights, preset {config.name}"
    meta = json.loads((Path(source) / CONFIG).read_text())
    if image_size is None or tuple(meta["model"]["image_size"]) == tuple(image_size):
        return Path(source), str(source)
    out = workdir / "checkpoint"
    shutil.copytree(source, out)
    meta["model"]["image_size"] = list(image_size)
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out, f"{source} (canvas {image_size[0]}x{image_size[1]})"


def load_model(checkpoint: Path) -> MAD:
    mad, _ = load_checkpoint(checkpoint, "cpu")
    return mad


def synthetic_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A deterministic scene of shapes and stick figures (synthetic world v1, so figures stay
    comparable), resized to (height, width): real edges and colours, so JPEG sizes are
    realistic."""
    from model.data.synth import render_synthetic_image

    pixels, _, _ = render_synthetic_image(np.random.default_rng(seed), world="v1")
    return (
        Image.fromarray(pixels).convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    )


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def detection_prompts(
    mad: MAD, count: int, contexts: list[DecodeContext]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[DecodeContext]]:
    """`count` boxes per image as if detected (a grid over the canvas, all persons so that
    keypoints run for each) -> (tokens [S, 5], image_index [S], pixel boxes, contexts [S])."""
    vocab = mad.vocab
    person = mad.config.class_names.index(mad.config.person_class)
    side = max(1, int(np.ceil(np.sqrt(count))))
    cells = torch.arange(count)
    x0, y0 = (cells % side).float() / side, (cells // side).float() / side
    boxes = torch.stack([x0, y0, x0 + 0.8 / side, y0 + 0.8 / side], 1).clamp(0, 1)
    labels = torch.full((count,), person)
    tokens = torch.cat([vocab.quantize(boxes), vocab.class_token(labels).unsqueeze(1)], 1)
    n = len(contexts)
    owners = torch.arange(n).repeat_interleave(count)
    pixel_boxes = [contexts[i].to_pixels(boxes[j]) for i in range(n) for j in range(count)]
    return tokens.repeat(n, 1), owners, pixel_boxes, [contexts[i] for i in owners.tolist()]
