"""Merge COCO-layout datasets into one (`mad data merge`), e.g. to mix two synthetic worlds
or a synthetic world into real data so a fine-tune does not forget what it knew.

The merged root holds re-numbered annotation files and, per split, relative symlinks to the
sources' images (no pixel is copied). Sources must share their categories (ids and names)
and their keypoint schema; a split is merged when every source has its instances file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ANNOTATION_KINDS = ("instances", "person_keypoints", "captions")


class MergeError(ValueError):
    """The sources cannot be merged; the message says why."""


def _load(root: Path, kind: str, split: str) -> dict[str, Any] | None:
    path = root / "annotations" / f"{kind}_{split}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _schema(categories: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            c["id"],
            c["name"],
            tuple(c.get("keypoints", ())),
            tuple(map(tuple, c.get("skeleton", ()))),
        )
        for c in sorted(categories, key=lambda c: c["id"])
    ]


def _splits(sources: list[Path]) -> list[str]:
    found = [
        {
            p.name[len("instances_") : -len(".json")]
            for p in (s / "annotations").glob("instances_*.json")
        }
        for s in sources
    ]
    return sorted(set.intersection(*found)) if found else []


def merge_datasets(
    sources: list[Path], out: Path, repeats: list[int] | None = None
) -> dict[str, int]:
    """Write `out` as the union of `sources`; returns images per merged split.

    `repeats[i]` lists source i's training images (splits named train*) that many times, to
    weight a small source up; the copies share the image file but get their own ids. Other
    splits list each image once, so evaluation counts every image once. A source without a
    person_keypoints or captions file contributes no labels of that kind. Every source is
    read and checked before anything is written.
    """
    if len(sources) < 2:
        raise MergeError("give at least two datasets to merge")
    repeats = repeats or [1] * len(sources)
    if len(repeats) != len(sources) or min(repeats) < 1:
        raise MergeError("one repeat count >= 1 per source")
    for source in sources:
        if not (source / "annotations").is_dir():
            raise MergeError(f"{source}: no annotations/ directory (not a COCO-layout dataset)")
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out}: exists and is not empty")
    splits = _splits(sources)
    if not splits:
        raise MergeError("the sources have no split in common (annotations/instances_<split>.json)")
    loaded = {split: [_checked(source, split) for source in sources] for split in splits}
    for split, files in loaded.items():
        _check_schemas(sources, files, split)
    return {
        split: _merge_split(
            sources, files, repeats if split.startswith("train") else [1] * len(sources), out, split
        )
        for split, files in loaded.items()
    }


Files = dict[str, dict[str, Any]]  # annotation kind -> its JSON


def _checked(source: Path, split: str) -> Files:
    """A source's annotation files of `split`, each annotating only images it lists."""
    files = {kind: data for kind in ANNOTATION_KINDS if (data := _load(source, kind, split))}
    images = {image["id"] for image in files["instances"]["images"]}
    for kind, data in files.items():
        unknown = {a["image_id"] for a in data["annotations"]} - images
        if unknown:
            raise MergeError(
                f"{source}: {kind}_{split}.json annotates images that instances_{split}.json "
                f"lacks (e.g. id {min(unknown)})"
            )
    return files


def _check_schemas(sources: list[Path], files: list[Files], split: str) -> None:
    """Each annotation kind has the same categories in every source that has it."""
    for kind in ANNOTATION_KINDS:
        having = [(s, f[kind]) for s, f in zip(sources, files, strict=True) if kind in f]
        for source, data in having[1:]:
            if _schema(data.get("categories", [])) != _schema(having[0][1].get("categories", [])):
                raise MergeError(
                    f"{source}: {kind}_{split}.json has other categories than {having[0][0]}"
                )


def _merge_split(
    sources: list[Path], files: list[Files], repeats: list[int], out: Path, split: str
) -> int:
    merged: dict[str, dict[str, Any]] = {}
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    next_image, next_ann = 1, 1
    for index, (source, source_files, repeat) in enumerate(
        zip(sources, files, repeats, strict=True)
    ):
        for copy in range(repeat):
            renamed: dict[int, dict[str, Any]] = {}  # old image id -> its new id and file
            for image in source_files["instances"]["images"]:
                link = f"s{index}r{copy}_{image['file_name']}"
                target = source.resolve() / split / image["file_name"]
                (image_dir / link).symlink_to(os.path.relpath(target, image_dir.resolve()))
                renamed[image["id"]] = {"id": next_image, "file_name": link}
                next_image += 1
            # COCO keeps a person's keypoints in person_keypoints_*.json under the id of its
            # instances annotation: one new id per old id across those two files.
            object_ids: dict[int, int] = {}
            for kind, data in source_files.items():
                into = merged.setdefault(
                    kind,
                    {k: v for k, v in data.items() if k not in ("images", "annotations")}
                    | {"images": [], "annotations": []},
                )
                into["images"] += [
                    image | renamed[image["id"]]
                    for image in data["images"]
                    if image["id"] in renamed
                ]
                for ann in data["annotations"]:
                    if kind == "captions":
                        new_id = next_ann
                    else:
                        new_id = object_ids.setdefault(ann["id"], next_ann)
                    if new_id == next_ann:
                        next_ann += 1
                    into["annotations"].append(
                        ann | {"id": new_id, "image_id": renamed[ann["image_id"]]["id"]}
                    )
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for kind, data in merged.items():
        (out / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(data))
    return next_image - 1
