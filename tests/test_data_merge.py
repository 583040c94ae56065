"""`mad data merge`: the union of COCO-layout datasets, re-numbered, images linked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from mad.cli import app as mad_cli
from model.data.coco import CocoMultiTaskDataset
from model.data.merge import MergeError, merge_datasets
from model.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    write_synthetic_dataset(root / "v1", train=3, val=2, seed=1, world="v1")
    write_synthetic_dataset(root / "v2", train=4, val=1, seed=2, world="v2")
    return root


def test_merged_dataset_holds_every_source_image_with_its_labels(worlds, tmp_path):
    counts = merge_datasets([worlds / "v1", worlds / "v2"], tmp_path / "mix", [2, 1])
    assert counts == {"train2017": 3 * 2 + 4, "val2017": 2 + 1}

    merged = CocoMultiTaskDataset(tmp_path / "mix", "train2017")
    assert len(merged) == 10 and len(set(merged.ids)) == 10
    sources = [CocoMultiTaskDataset(worlds / w, "train2017") for w in ("v1", "v1", "v2")]
    originals = [(s, i) for s in sources for i in s.ids]
    assert merged.class_names == sources[0].class_names
    assert merged.keypoint_names == sources[0].keypoint_names
    for image_id, (source, original_id) in zip(merged.ids, originals, strict=True):
        assert torch.equal(merged.load_image(image_id), source.load_image(original_id))
        want, got = source.load_target(original_id), merged.load_target(image_id)
        assert torch.equal(got["boxes"], want["boxes"])
        assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["keypoints"], want["keypoints"])
        assert merged.captions(image_id) == source.captions(original_id)

    instances = json.loads((tmp_path / "mix/annotations/instances_train2017.json").read_text())
    annotation_ids = [a["id"] for a in instances["annotations"]]
    assert len(annotation_ids) == len(set(annotation_ids))


def test_merge_refuses_what_it_cannot_merge(worlds, tmp_path):
    with pytest.raises(MergeError, match="at least two"):
        merge_datasets([worlds / "v1"], tmp_path / "a")
    with pytest.raises(MergeError, match="not a COCO-layout"):
        merge_datasets([worlds / "v1", tmp_path], tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(MergeError, match="not empty"):
        merge_datasets([worlds / "v1", worlds / "v2"], tmp_path / "full")

    other = tmp_path / "other"
    write_synthetic_dataset(other, train=1, val=0, seed=3)
    path = other / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["categories"][1]["name"] = "disc"
    path.write_text(json.dumps(data))
    with pytest.raises(MergeError, match="other categories"):
        merge_datasets([worlds / "v1", other], tmp_path / "c")
    assert not (tmp_path / "c").exists()  # everything is checked before anything is written


def test_keypoints_kept_only_in_the_keypoints_file_stay_with_their_persons(worlds, tmp_path):
    """Real COCO keeps keypoints only in person_keypoints_*.json, under the id of the
    instances annotation: the merge must keep the two ids equal."""
    coco_like = tmp_path / "coco-like"
    shutil.copytree(worlds / "v2", coco_like)
    for split in ("train2017", "val2017"):
        path = coco_like / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        for ann in data["annotations"]:
            ann.pop("keypoints", None)
            ann.pop("num_keypoints", None)
        path.write_text(json.dumps(data))

    def labelled_persons(dataset):
        return sum(
            int((dataset.load_target(i)["keypoints"][..., 2] > 0).any(-1).sum())
            for i in dataset.ids
        )

    source = CocoMultiTaskDataset(coco_like, "train2017")
    assert labelled_persons(source) > 0
    merge_datasets([worlds / "v1", coco_like], tmp_path / "mix")
    merged = CocoMultiTaskDataset(tmp_path / "mix", "train2017")
    v1 = CocoMultiTaskDataset(worlds / "v1", "train2017")
    assert labelled_persons(merged) == labelled_persons(v1) + labelled_persons(source)


def test_cli_merges_and_reports_errors_in_one_line(worlds, tmp_path):
    ok = CliRunner().invoke(
        mad_cli,
        ["data", "merge", str(worlds / "v1"), str(worlds / "v2"), "--out", str(tmp_path / "m")],
    )
    assert ok.exit_code == 0, ok.output
    assert "train2017: 7 images" in ok.output
    bad = CliRunner().invoke(
        mad_cli,
        [
            "data",
            "merge",
            str(worlds / "v1"),
            str(worlds / "v2"),
            "--out",
            str(tmp_path / "n"),
            "--repeat",
            "1",
        ],
    )
    assert bad.exit_code == 2
    assert "one repeat count" in bad.output and "Traceback" not in bad.output
