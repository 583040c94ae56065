"""Write a synthetic world to disk in the COCO 2017 layout (`mad data synth`).

Images are PNGs; annotations are instances (boxes, RLE masks of the visible pixels, and
keypoints on persons), person_keypoints and captions files per split. Everything derives
from (world, seed, split, index), so output is identical for any number of workers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.data.synth import v1, v2, v3
from model.data.synth.common import CATEGORIES, KEYPOINT_NAMES, SKELETON, image_rng
from model.mask_formats import encode_rle

Renderer = Callable[[np.random.Generator], tuple[np.ndarray, list[dict], list[str]]]
WORLDS: dict[str, Renderer] = {
    "v1": v1.render_image,
    "v2": v2.render_image,
    "v3": v3.render_image,
}
DEFAULT_WORLD = "v2"
SPLIT_ID_BASE = {"train2017": 0, "val2017": 5_000_000}  # image ids unique across splits

_INFO_BASE = {"year": 2017, "contributor": "mad-serve", "date_created": "2017-01-01"}
INFO = {
    "v1": {"description": "MAD Serve synthetic shapes and stick figures", "version": "1.0"}
    | _INFO_BASE,
    "v2": {
        "description": "MAD Serve synthetic world v2: shapes and figures in randomised styles",
        "version": "2.0",
    }
    | _INFO_BASE,
    "v3": {
        "description": "MAD Serve synthetic world v3: world v2, some of it on natural backgrounds",
        "version": "3.0",
    }
    | _INFO_BASE,
}
LICENSES = [
    {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
]
COCO_CATEGORIES = [
    {"id": i + 1, "name": name, "supercategory": "person" if i == 0 else "shape"}
    | ({"keypoints": KEYPOINT_NAMES, "skeleton": SKELETON} if name == "person" else {})
    for i, name in enumerate(CATEGORIES)
]


def render_synthetic_image(
    rng: np.random.Generator, world: str = DEFAULT_WORLD
) -> tuple[np.ndarray, list[dict], list[str]]:
    """One image of `world`: (HxWx3 uint8, visible objects, five captions).

    Object dicts: category, colour, mask (bool HxW, visible pixels), bbox (xywh), area,
    and for persons keypoints [17, 3] (x, y, v) in COCO visibility convention.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {sorted(WORLDS)}, not {world!r}")
    return WORLDS[world](rng)


def _render_one(job: tuple[Path, str, int, int, str]) -> dict:
    """Render, save the PNG and return picklable annotation material for one image."""
    out_dir, split, seed, index, world = job
    img, objects, captions = render_synthetic_image(image_rng(seed, split, index), world)
    image_id = SPLIT_ID_BASE.get(split, 0) + index + 1
    file_name = f"{image_id:012d}.png"
    Image.fromarray(img).save(out_dir / split / file_name, compress_level=3)
    anns = []
    for obj in objects:
        category_id = CATEGORIES.index(obj["category"]) + 1
        ann = {
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": encode_rle(obj["mask"]),
        }
        ann |= {"area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0}
        if "keypoints" in obj:
            kps = obj["keypoints"]
            ann["keypoints"] = [int(v) for v in kps.reshape(-1)]
            ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
        anns.append(ann)
    image = {"id": image_id, "file_name": file_name, "width": img.shape[1], "height": img.shape[0]}
    return {"image": image, "anns": anns, "captions": captions}


def write_split(
    out_dir: Path, split: str, count: int, seed: int, workers: int = 1, world: str = DEFAULT_WORLD
) -> dict:
    """Write one split's images and its three annotation files; returns counts."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {sorted(WORLDS)}, not {world!r}")
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, split, seed, i, world) for i in range(count)]
    if workers > 1 and count > 1:
        with Pool(workers) as pool:  # imap keeps order, so ids are worker-independent
            results = list(pool.imap(_render_one, jobs, chunksize=16))
    else:
        results = [_render_one(job) for job in jobs]

    # Ids are assigned here, in image order, so they do not depend on the worker count.
    images = [res["image"] for res in results]
    instances = [ann for res in results for ann in res["anns"]]
    for ann_id, ann in enumerate(instances, start=1):
        ann["id"] = ann_id
    persons = [ann for ann in instances if "keypoints" in ann]
    captions: list[dict[str, Any]] = []
    for res in results:
        for text in res["captions"]:
            captions.append(
                {"id": len(captions) + 1, "image_id": res["image"]["id"], "caption": text}
            )

    files = {
        "instances": {"annotations": instances, "categories": COCO_CATEGORIES},
        "person_keypoints": {"annotations": persons, "categories": COCO_CATEGORIES[:1]},
        # No categories here, as in COCO: pycocotools' COCO() fails on caption files with them.
        "captions": {"annotations": captions},
    }
    for kind, body in files.items():
        doc = {"info": INFO[world], "licenses": LICENSES, "images": images, **body}
        path = out_dir / "annotations" / f"{kind}_{split}.json"
        path.write_text(json.dumps(doc, separators=(",", ":")))
    return {"images": len(images), "objects": len(instances), "persons": len(persons)}


def write_synthetic_dataset(
    out_dir: Path, train: int, val: int, seed: int, workers: int = 1, world: str = DEFAULT_WORLD
) -> dict[str, dict]:
    """Write train2017/val2017 images and annotations under out_dir; returns per-split counts.

    Splits use separate random streams (split name enters every image's seed), so train
    and val never share images. A split with 0 images gets valid, empty annotation files.
    """
    out_dir = Path(out_dir)
    return {
        "train2017": write_split(out_dir, "train2017", train, seed, workers, world),
        "val2017": write_split(out_dir, "val2017", val, seed, workers, world),
    }


# What the instances files of a dataset written here begin with (compact JSON, info first).
WRITTEN_HERE = re.compile(r'\{"info":\{[^{}]*"contributor":"mad-serve"')


def is_synthetic_dataset(root: Path) -> bool:
    """Whether `root` holds nothing but a dataset this module wrote (its instances files say
    so): what `mad data synth` may replace. A COCO download or a merged set is not one."""
    if not {entry.name for entry in root.iterdir()} <= {"annotations", *SPLIT_ID_BASE}:
        return False
    annotations = root / "annotations"
    files = list(annotations.iterdir()) if annotations.is_dir() else []
    instances = [f for f in files if f.name.startswith("instances_")]
    if not instances or not all(f.is_file() for f in files):
        return False
    for path in instances:
        with path.open("rb") as file:
            if not WRITTEN_HERE.match(file.read(1024).decode("utf-8", "replace")):
                return False
    return True


def main(
    out: Path, train: int, val: int, seed: int, workers: int = 1, world: str = DEFAULT_WORLD
) -> None:
    """CLI entry (`mad data synth`): write the dataset and print a one-line summary."""
    stats = write_synthetic_dataset(out, train, val, seed, workers, world)
    total = {k: sum(s[k] for s in stats.values()) for k in ("images", "objects", "persons")}
    print(
        f"wrote {total['images']} images ({train} train, {val} val) of world {world}, "
        f"{total['objects']} objects, {total['persons']} persons to {out}"
    )
