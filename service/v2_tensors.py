"""The Open Inference Protocol's tensors: the model's results as named outputs, and the BYTES
encoding both transports (REST binary data, gRPC raw contents) share.

Outputs of a request of B images (the first dimension is always the image), D the most
detections any of them kept, K the model's keypoint names. Rows past an image's own
detections are padding: zeros, label -1, empty mask.

    name            datatype  shape         produced when
    image_size      INT32     [B, 2]        always: height, width of each image
    json            BYTES     [B]           always: each image's POST /predict response (JSON)
    num_detections  INT32     [B]           detection ran: the rows of each image that are real
    boxes           FP32      [B, D, 4]     detection ran: x0, y0, x1, y1 in image pixels
    scores          FP32      [B, D]        detection ran
    labels          INT32     [B, D]        detection ran: index into the model's class_names
    masks_rle       BYTES     [B, D]        segmentation ran: COCO compressed RLE `counts` of
                                            an image_size mask
    mask_scores     FP32      [B, D]        segmentation ran: each mask's score (0: no mask)
    keypoints       FP32      [B, D, K, 3]  keypoints ran: x, y, score (all 0: not a person)
    caption         BYTES     [B]           caption ran (UTF-8)

A BYTES tensor on the wire is its elements in row-major order, each a 4-byte little-endian
length and then that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.codecs import DetectionCodec, TaskCodec
from model.codecs.caption import CaptionCodec
from model.codecs.keypoints import KeypointCodec
from model.codecs.segmentation import SegmentationCodec
from model.config import ModelConfig
from model.inference_io import Result
from model.mask_formats import encode_rle

NUMPY_TYPES = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4")}
LENGTH = struct.Struct("<I")


class TensorDataError(ValueError):
    """Tensor bytes that do not decode (the client's mistake)."""


@dataclass(frozen=True)
class OutputSpec:
    """One output the model can return; `task`: the task whose run produces it (None: every
    request)."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable
    task: str | None


@dataclass
class Tensor:
    """An output: `data` holds numbers of the datatype, or bytes objects (BYTES)."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    def raw(self) -> bytes:
        """The tensor as the wire carries it outside JSON."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.data.flat)
        return self.data.astype(NUMPY_TYPES[self.datatype], copy=False).tobytes()

    def json_data(self) -> list[Any]:
        """The tensor as JSON carries it: flat, row-major; BYTES elements as text."""
        if self.datatype == "BYTES":
            return [element.decode("utf-8") for element in self.data.flat]
        return self.data.reshape(-1).tolist()


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Length-prefixed elements -> the elements; raises TensorDataError when `raw` is not
    exactly a sequence of them."""
    elements: list[bytes] = []
    at = 0
    view = memoryview(raw)
    while at < len(raw):
        if at + LENGTH.size > len(raw):
            raise TensorDataError(
                f"BYTES data ends inside the 4-byte length of element {len(elements)}"
            )
        (size,) = LENGTH.unpack_from(view, at)
        at += LENGTH.size
        if at + size > len(raw):
            raise TensorDataError(
                f"BYTES element {len(elements)} says {size} bytes, but only "
                f"{len(raw) - at} are left"
            )
        elements.append(bytes(view[at : at + size]))
        at += size
    return elements


def output_specs(config: ModelConfig) -> list[OutputSpec]:
    """The outputs of a model with `config`'s tasks, in the order responses list them."""
    detection = DetectionCodec.name
    keypoints = len(config.keypoint_names)
    catalogue = [
        OutputSpec("image_size", "INT32", (-1, 2), None),
        OutputSpec("json", "BYTES", (-1,), None),
        OutputSpec("num_detections", "INT32", (-1,), detection),
        OutputSpec("boxes", "FP32", (-1, -1, 4), detection),
        OutputSpec("scores", "FP32", (-1, -1), detection),
        OutputSpec("labels", "INT32", (-1, -1), detection),
        OutputSpec("masks_rle", "BYTES", (-1, -1), SegmentationCodec.name),
        OutputSpec("mask_scores", "FP32", (-1, -1), SegmentationCodec.name),
        OutputSpec("keypoints", "FP32", (-1, -1, keypoints, 3), KeypointCodec.name),
        OutputSpec("caption", "BYTES", (-1,), CaptionCodec.name),
    ]
    return [spec for spec in catalogue if spec.task is None or spec.task in config.tasks]


def padded(rows: Sequence[np.ndarray], tail: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
    """Per-image arrays [N_i, *tail] -> [B, max N_i, *tail], `fill` past each N_i."""
    longest = max((len(row) for row in rows), default=0)
    out = np.full((len(rows), longest, *tail), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def keypoint_rows(result: Result, count: int) -> np.ndarray:
    """[N, count, 3]: one row per detection, zeros where keypoints do not apply."""
    rows = np.zeros((len(result.required_detections()), count, 3), dtype=np.float32)
    for j, points in enumerate(result.keypoints or []):
        if points is not None:
            rows[j] = points.float().numpy()
    return rows


def mask_rows(result: Result) -> np.ndarray:
    """[N] RLE counts, one per detection (empty where there is no mask)."""
    masks = result.masks or []
    return bytes_array(
        [b"" if m is None else encode_rle(m)["counts"].encode("ascii") for m in masks]
    )


def mask_score_rows(result: Result, codec: TaskCodec) -> np.ndarray:
    """[N] each detection's mask score (0 where there is no mask)."""
    masks, scores = result.masks or [], codec.output_scores(result)
    rows = [0.0 if m is None else score for m, score in zip(masks, scores, strict=True)]
    return np.array(rows, dtype=np.float32)


def bytes_array(elements: Sequence[bytes]) -> np.ndarray:
    out = np.empty(len(elements), dtype=object)
    out[:] = list(elements)
    return out


def output_tensor(
    spec: OutputSpec,
    results: list[Result],
    json_bodies: Callable[[], list[bytes]],
    codecs: Mapping[str, TaskCodec],
) -> Tensor:
    """`spec`'s tensor for these results (every image ran the task `spec` needs), decoded by
    the model's `codecs`."""
    name = spec.name
    detections = (
        [r.required_detections() for r in results] if spec.task == DetectionCodec.name else []
    )
    data: np.ndarray
    if name == "image_size":
        data = np.array([r.image_size for r in results], dtype=np.int32).reshape(-1, 2)
    elif name == "json":
        data = bytes_array(json_bodies())
    elif name == "num_detections":
        data = np.array([len(d) for d in detections], dtype=np.int32)
    elif name == "boxes":
        data = padded([d.boxes.float().numpy() for d in detections], (4,), 0.0, np.float32)
    elif name == "scores":
        data = padded([d.scores.float().numpy() for d in detections], (), 0.0, np.float32)
    elif name == "labels":
        data = padded([d.labels.numpy() for d in detections], (), -1, np.int32)
    elif name == "masks_rle":
        data = padded([mask_rows(r) for r in results], (), b"", object)
    elif name == "mask_scores":
        segmentation = codecs[SegmentationCodec.name]
        data = padded([mask_score_rows(r, segmentation) for r in results], (), 0.0, np.float32)
    elif name == "keypoints":
        count = spec.shape[2]
        rows = [keypoint_rows(r, count) for r in results]
        data = padded(rows, (count, 3), 0.0, np.float32)
    elif name == "caption":
        data = bytes_array([(r.caption or "").encode("utf-8") for r in results])
    else:  # output_specs and this function list the same names
        raise KeyError(name)
    return Tensor(name, spec.datatype, data)
