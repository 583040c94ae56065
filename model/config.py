"""Model configuration: one dataclass, named presets, JSON round trip.

Everything a checkpoint needs to rebuild the network and its sequence language lives here,
including class names and keypoint names, so a checkpoint directory is self-describing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The presets' tasks (the built-in codecs); a config may name any registered codec.
TASKS = ("detection", "segmentation", "keypoints", "caption")

COCO_KEYPOINT_NAMES = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
]


def flip_pairs_from_names(keypoint_names: list[str]) -> list[tuple[int, int]]:
    """Index pairs ("left_x", "right_x") that swap when the image is mirrored."""
    index = {name: i for i, name in enumerate(keypoint_names)}
    return [
        (i, index["right_" + name[5:]])
        for i, name in enumerate(keypoint_names)
        if name.startswith("left_") and "right_" + name[5:] in index
    ]


def swapped_order(count: int, pairs: list[tuple[int, int]]) -> list[int]:
    """The order of `count` keypoints once each pair (`flip_pairs_from_names`) swaps places."""
    order = list(range(count))
    for left, right in pairs:
        order[left], order[right] = right, left
    return order


# COCO's skeleton, as 0-based index pairs.
COCO_SKELETON = [
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
]
# COCO 2017's 80 detection categories in category-id order (what training on COCO reads from
# the annotation file, which keeps overriding them).
COCO_CLASS_NAMES = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]
SYNTH_CLASS_NAMES = ["person", "circle", "square", "triangle", "star", "hexagon"]
AUGMENTATIONS = ("fit", "multiscale")
# Declared type (its name before "[") -> what a value may be; int counts as float, and JSON
# gives lists for tuples.
FIELD_KINDS: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
    "list": list,
    "dict": dict,
    "tuple": (list, tuple),
}
# Fields that neither shape the network nor its sequence language: how it was trained (its
# initial backbone file included) and its decoding defaults. Checkpoints that differ only in
# these hold weights of one network (`mad checkpoint average`).
TRAINING_AND_DECODING_FIELDS = (
    "backbone_weights",
    "dropout",
    "task_weights",
    "train_mask_ratio",
    "no_object_weight",
    "train_augmentation",
    "train_zoom_crops",
    "max_instances_per_image",
    "segmentation_masked_copies",
    "nms_iou",
    "box_confidence_exponent",
    "coordinate_window",
    "mask_threshold",
    "mask_scoring",
    "caption_candidates",
    "detection_flip",
    "segmentation_flip",
    "keypoints_flip",
    "zoom",
    "zoom_context",
    "detection_zoom",
    "segmentation_zoom",
    "keypoints_zoom",
    "schedules",
)
POSITIVE_FIELDS = (
    "d_model",
    "n_heads",
    "decoder_layers",
    "ffn_dim",
    "num_bins",
    "num_slots",
    "mask_size",
    "caption_len",
    "text_vocab_size",
    "max_instances_per_image",
)


@dataclass
class ModelConfig:
    """Hyper-parameters of one MAD model and of its sequence language."""

    name: str = "r50"
    # Backbone: "resnet18|34|50|101" (torchvision) or "timm:<model name>".
    backbone: str = "resnet50"
    backbone_last_stage: int = 4  # ResNets: 4 -> stride 32, 3 -> stride 16 (cheaper, finer)
    backbone_weights: str | None = None  # local file only; nothing is ever downloaded
    frozen_batchnorm: bool = True  # right for pretrained backbones, wrong from scratch
    d_model: int = 256
    n_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    # A LayerNorm shared by all decoder layers' outputs before the head, as the reference's
    # decoder has; False only for checkpoints from before it existed (the presets set True).
    decoder_final_norm: bool = False
    # The decoder also cross-attends to the backbone stage before the last (stride 8 under
    # backbone_last_stage 3), projected but not encoded: 4x as many tokens again as the
    # stride-16 level, finer detail for keypoints and small objects. ResNets and hierarchical
    # timm backbones (Swin); not ViT, whose blocks all have one stride.
    fine_memory: bool = False
    # Images are letterboxed into this canvas (height, width); coordinates are binned over it.
    image_size: tuple[int, int] = (800, 1333)
    # Sequence language.
    num_bins: int = 500
    num_slots: int = 100
    mask_size: int = 16
    caption_len: int = 20
    class_names: list[str] = field(default_factory=lambda: list(COCO_CLASS_NAMES))
    keypoint_names: list[str] = field(default_factory=lambda: list(COCO_KEYPOINT_NAMES))
    skeleton: list[tuple[int, int]] = field(default_factory=lambda: list(COCO_SKELETON))
    person_class: str = "person"
    text_vocab_size: int = 11421
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # Masked training.
    task_weights: dict[str, float] = field(
        default_factory=lambda: {
            "detection": 1.5,
            "segmentation": 2.7,
            "keypoints": 0.5,
            "caption": 0.3,
        }
    )
    train_mask_ratio: float = 0.7
    no_object_weight: float = 0.1  # loss weight of an unmatched slot's "no object" (DETR: 0.1)
    # Training augmentation (model.data.transforms.training_transforms): "multiscale", the
    # reference's scales (short side 480..800, max 1333, crops; the presets but tiny), or
    # "fit": every image fitted to the canvas (tiny, and checkpoints from before this field).
    train_augmentation: str = "fit"
    # The share of training images replaced by a zoomed crop around one of their objects, cut
    # as inference cuts them (model.zoom, with `zoom` and `zoom_context`), so the model learns
    # the enlarged views the tasks with a zoom option decode on; such a crop trains no caption.
    # Images none of whose objects gets a crop (none, or all large) keep their augmentation.
    train_zoom_crops: float = 0.0
    max_instances_per_image: int = 10  # segmentation / keypoint sequences per image
    # Masked copies of each instance's segmentation sequence: 1, fully or partly masked (even
    # odds); 2, both, as the reference (twice the decoder work of the longest sequences).
    segmentation_masked_copies: int = 1
    # Class-wise NMS IoU after detection decoding (1.0: off); a request may override it.
    nms_iou: float = 1.0
    # Decoding (defaults: the reference's; the presets and the bundled model set their own).
    # A detection's score is p(class) x box confidence ** this, the box confidence being the
    # geometric mean over its four coordinates of the probability of the bins each was read
    # from (`coordinate_window`): boxes the model is unsure of rank lower, and so do the masks
    # and keypoints they prompt (0: p(class) alone).
    box_confidence_exponent: float = 0.0
    # Box and keypoint coordinates: the probability-weighted mean of the bins within this many
    # of the most likely one, finer than a bin where the model spreads its belief (0: the most
    # likely bin's centre).
    coordinate_window: int = 0
    # A mask is the box's pixels whose foreground probability reaches this.
    mask_threshold: float = 0.5
    # A mask's score is its detection's x the mean foreground probability inside the mask
    # (SOLO's "maskness"), so COCO mask AP ranks confident masks first (False: the detection's).
    mask_scoring: bool = False
    # Detection also decodes the image's mirror image (one more encoder and detection pass)
    # and fuses the two views' boxes (DetectionCodec.fuse_flipped; False: one view).
    detection_flip: bool = False
    # Masks and keypoints also decode on the image's mirror image, prompted by the mirrored
    # boxes, and average the two views' probabilities (TaskCodec.from_mirror; False: one view).
    segmentation_flip: bool = False
    keypoints_flip: bool = False
    # Zoomed crops (model.zoom): each kept detection gets a crop of its image around its box,
    # spanning `zoom_context` times the box and enlarged up to `zoom` times over the whole
    # image's view. Detection re-reads each box on its crop; masks and keypoints decode on
    # it (False: on the whole image).
    zoom: float = 3.0
    zoom_context: float = 3.0
    detection_zoom: bool = False
    segmentation_zoom: bool = False
    keypoints_zoom: bool = False
    # Captions refined apart per image (each re-masking its own random positions), of which
    # the one the model finds most likely is kept (model.decoding; 1: the reference's one).
    caption_candidates: int = 1
    # Masked inference: default mask-ratio schedule per task (K = len(schedule)).
    schedules: dict[str, list[float]] = field(
        default_factory=lambda: {
            "detection": [],
            "segmentation": [],
            "keypoints": [0.7],
            "caption": [0.8, 0.6, 0.4],
        }
    )

    def __post_init__(self) -> None:
        self._check_types()
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be [height, width], not {self.image_size!r}")
        height, width = self.image_size  # a list, when read from JSON
        self.image_size = (height, width)
        self.skeleton = [(a, b) for a, b in self.skeleton]
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if self.train_augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"train_augmentation must be one of {AUGMENTATIONS}, "
                f"not {self.train_augmentation!r}"
            )
        if self.box_confidence_exponent < 0:
            raise ValueError("box_confidence_exponent must be at least 0")
        if self.coordinate_window < 0:
            raise ValueError("coordinate_window must be at least 0")
        if self.caption_candidates < 1:
            raise ValueError("caption_candidates must be at least 1")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError("mask_threshold must be between 0 and 1")
        if self.zoom < 1:
            raise ValueError("zoom must be at least 1")
        if self.zoom_context < 1:
            raise ValueError("zoom_context must be at least 1")
        if not 0.0 <= self.train_zoom_crops <= 1.0:
            raise ValueError("train_zoom_crops must be between 0 and 1")
        if self.segmentation_masked_copies not in (1, 2):
            raise ValueError("segmentation_masked_copies must be 1 or 2")
        for task, ratios in self.schedules.items():
            if not all(isinstance(r, int | float) and 0.0 <= r <= 1.0 for r in ratios):
                raise ValueError(f"schedules[{task!r}] must be mask ratios in 0..1, not {ratios}")

    def _check_types(self) -> None:
        """Each field of the type it is declared with (a config read from JSON or given by
        --set is not checked by Python), and sizes and counts positive."""
        for f in dataclasses.fields(self):
            check_field_type(f, getattr(self, f.name))
        for name in POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        sides = self.image_size
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
            raise ValueError(f"image_size must be two positive integers, not {self.image_size!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["skeleton"] = [list(pair) for pair in self.skeleton]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def to_json(self, path: Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _r50() -> ModelConfig:
    return ModelConfig(decoder_final_norm=True, train_augmentation="multiscale")


def _swin_b() -> ModelConfig:
    return ModelConfig(
        name="swin-b",
        backbone="timm:swin_base_patch4_window7_224",
        decoder_final_norm=True,
        train_augmentation="multiscale",
    )


def _vit_b() -> ModelConfig:
    return ModelConfig(
        name="vit-b",
        backbone="timm:vit_base_patch16_224",
        decoder_final_norm=True,
        train_augmentation="multiscale",
    )


def _tiny() -> ModelConfig:
    # Sized to learn the synthetic world on 2 CPU cores in about an hour and to ship in a few
    # MB: ResNet-18 cut after stage 3 (stride 16 keeps 16 px objects visible on a 256 canvas,
    # and drops the 8M-parameter stage 4), width 128, 2+3 layers, 1 bin per pixel, 20 slots
    # (the synthetic world has at most 8 objects), BatchNorm trained because nothing is
    # pretrained.
    return ModelConfig(
        name="tiny",
        backbone="resnet18",
        backbone_last_stage=3,
        frozen_batchnorm=False,
        d_model=128,
        n_heads=4,
        encoder_layers=2,
        decoder_layers=3,
        ffn_dim=512,
        dropout=0.0,
        decoder_final_norm=True,
        image_size=(256, 256),
        num_bins=256,
        num_slots=20,
        class_names=list(SYNTH_CLASS_NAMES),
        text_vocab_size=256,
        max_instances_per_image=4,
        # What `mad tune --decoding` chose for the bundled model (docs/model-card.md), but the
        # mask threshold: that one depends on how sharp a trained model's masks are.
        box_confidence_exponent=1.0,
        coordinate_window=3,
        mask_scoring=True,
    )


PRESETS = {"r50": _r50, "swin-b": _swin_b, "vit-b": _vit_b, "tiny": _tiny}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh config for a named preset, with field overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return dataclasses.replace(config, **overrides) if overrides else config


def check_field_type(f: dataclasses.Field[Any], value: Any) -> None:
    """A ValueError unless `value` is of the type ModelConfig declares for field `f`."""
    kind = str(f.type)
    if kind.endswith(" | None"):
        if value is None:
            return
        kind = kind.removesuffix(" | None")
    expected = FIELD_KINDS.get(kind.split("[")[0])
    is_bool = isinstance(value, bool)
    if expected is not None and (
        not isinstance(value, expected) or (is_bool and kind in ("int", "float"))
    ):
        raise ValueError(f"{f.name} must be {kind}, not {value!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["d_model=64", "image_size=[128,128]"] -> {"d_model": 64, "image_size": [128, 128]}:
    each value JSON where it parses, else the string; ValueError for an item without "=",
    an unknown key or a value of another type than the field's."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
        known = list(fields)
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see model/config.py"
            raise ValueError(f"unknown config key {key!r} ({hint})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        check_field_type(fields[key], out[key])  # now, before any work: a usage error
    return out
