"""Synthetic worlds: v1 and v2 pinned byte for byte, v2's variety, labels and grammar, v3's
natural backgrounds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.synth import (
    CATEGORIES,
    KEYPOINT_NAMES,
    image_rng,
    render_synthetic_image,
    write_synthetic_dataset,
)
from model.data.synth.common import MIN_VISIBLE_PIXELS
from model.data.synth.grammar import grammar_errors
from model.data.synth.language import is_world_sentence
from model.data.synth.paint import COLOUR_NAMES, SHAPE_STYLES
from model.data.synth.persons import POSES

# Digest of `write_synthetic_dataset(root, train=6, val=3, seed=7, world="v1")`, taken from
# the generator as it was before world v2 existed: v1 must keep writing exactly this.
V1_SEED7_DIGEST = "ca1e071f4409ed4f98f8775b5e403cd4d367f95306192e050e87d98bc4e416e1"
# The same for world v2 (train=4, val=2, seed=7), taken before world v3 was built on it:
# the model card's v2 rows are measured on v2 datasets that must not change.
V2_SEED7_DIGEST = "5d991a764f67e1c541088a4cab130bce68e0c80053e73f59b0a8338a91be5c55"
# World v3 (train=6, val=0, seed=9: four of the six on natural backgrounds), under the pinned
# scikit-image, matplotlib and Pillow (constraints.txt): training sets must stay reproducible.
V3_SEED9_DIGEST = "6ec0b821b9d194c9de83b7a1731c9834f95a247ff12ac239f5e90fd3b138c371"


def _digest(root: Path) -> str:
    """Annotation file bytes and decoded PNG pixels (PNG bytes depend on the zlib build)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        h.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            pixels = np.asarray(Image.open(path))
            h.update(str(pixels.shape).encode())
            h.update(pixels.tobytes())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def test_world_v1_is_reproduced_exactly(tmp_path):
    write_synthetic_dataset(tmp_path, train=6, val=3, seed=7, world="v1")
    assert _digest(tmp_path) == V1_SEED7_DIGEST


def test_world_v2_is_reproduced_exactly(tmp_path):
    write_synthetic_dataset(tmp_path, train=4, val=2, seed=7, world="v2")
    assert _digest(tmp_path) == V2_SEED7_DIGEST


def test_world_v3_is_reproduced_exactly(tmp_path):
    write_synthetic_dataset(tmp_path, train=6, val=0, seed=9, world="v3")
    assert _digest(tmp_path) == V3_SEED9_DIGEST


# --------------------------------------------------------------------------- world v2


@pytest.fixture(scope="module")
def sample() -> list[tuple[np.ndarray, list[dict], list[str]]]:
    return [render_synthetic_image(image_rng(11, "test", i), "v2") for i in range(150)]


def test_world_v2_is_the_default_and_deterministic(tmp_path):
    a = render_synthetic_image(image_rng(3, "train2017", 5))
    b = render_synthetic_image(image_rng(3, "train2017", 5), "v2")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and [o["bbox"] for o in a[1]] == [o["bbox"] for o in b[1]]
    write_synthetic_dataset(tmp_path, train=1, val=0, seed=0)
    info = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())["info"]
    assert info["version"] == "2.0"
    with pytest.raises(ValueError, match="world"):
        render_synthetic_image(image_rng(0, "x", 0), "v9")


def test_v2_labels_are_the_visible_pixels(sample):
    for img, objects, _ in sample:
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape == (h, w, 3)
        claimed = np.zeros((h, w), dtype=np.int64)
        for obj in objects:
            mask = obj["mask"]
            claimed += mask
            assert obj["area"] == int(mask.sum()) >= MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            assert obj["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            if "keypoints" not in obj:
                continue
            kps = obj["keypoints"]
            assert (kps[kps[:, 2] == 0, :2] == 0).all()
            assert all(mask[y, x] for x, y, _ in kps[kps[:, 2] == 2])
            ls, rs = (
                kps[KEYPOINT_NAMES.index("left_shoulder")],
                kps[KEYPOINT_NAMES.index("right_shoulder")],
            )
            if obj["facing"] == "front" and ls[2] and rs[2]:
                assert ls[0] > rs[0]  # facing us, the person's left is on the image right
        assert claimed.max(initial=0) <= 1  # a pixel belongs to one object at most


def test_v2_is_varied(sample):
    objects = [o for _, objs, _ in sample for o in objs]
    persons = [o for o in objects if o["category"] == "person"]
    assert {o["category"] for o in objects} == set(CATEGORIES)
    assert {o["colour"] for o in objects} == set(COLOUR_NAMES)
    assert {o["style"] for o in objects} == set(SHAPE_STYLES)
    assert {o["pose"] for o in persons} == set(POSES)
    assert {o["facing"] for o in persons} == {"front", "left", "right"}
    assert min(o["bbox"][3] for o in persons) <= 32  # small persons
    assert any((o["keypoints"][:, 2] == 1).any() for o in persons)  # hidden joints
    assert len({img.shape for img, _, _ in sample}) > 100
    empty = [caps for _, objs, caps in sample if not objs]
    assert 1 <= len(empty) <= 0.2 * len(sample)
    for caps in empty:
        assert all({"no", "without", "nothing", "empty"} & set(c.split()) for c in caps), caps


def test_grammar_checker_catches_disagreement():
    assert grammar_errors("a objects including a person in red") == ["a objects", "a ... objects"]
    assert grammar_errors("a squares") == ["a ... squares"]
    assert grammar_errors("an red circle") == ["an red"]
    assert grammar_errors("two red circle and a blue squares") == [
        "two ... circle",
        "a ... squares",
    ]
    assert grammar_errors("there is two people") == ["there is two"]
    assert grammar_errors("two people in red is sitting") == ["two ... is"]
    assert grammar_errors("there are two people and an orange star") == []
    assert grammar_errors("a red circle and a") == ["ends with 'a'"]


def test_the_caption_language_holds_every_world_v1_caption_and_no_broken_one():
    rng = np.random.default_rng(4)
    for _ in range(60):
        assert all(is_world_sentence(c) for c in render_synthetic_image(rng, "v1")[2])
    # What models wrote on photos: no agreement error, yet not sentences.
    for broken in [
        "a person in is is the top triangle",
        "a person in red is at",
        "a but a background",
        "a blue circle below a person square",
        "a yellow circle to the right of",
    ]:
        assert not is_world_sentence(broken), broken
    for fine in ["a person in orange", "there are two people in red and an orange star"]:
        assert is_world_sentence(fine)


def test_v2_captions_are_grammatical(sample):
    for _, objects, captions in sample:
        assert len(captions) == 5
        names = {o["category"] for o in objects}
        words = names | {c + "s" for c in names} | ({"people"} if "person" in names else set())
        for text in captions:
            assert text == text.lower() and 3 <= len(text.split()) <= 18
            assert not grammar_errors(text), (text, grammar_errors(text))
            assert is_world_sentence(text), text
            if objects:
                assert words & set(text.split()), (text, names)


# --------------------------------------------------------------------------- world v3


def test_v3_draws_some_scenes_on_natural_images_never_evaluated_on(monkeypatch):
    from mad.bench.photos import PHOTOS
    from model.data.synth import v3

    evaluated = {name.split(".")[0] for name in PHOTOS}
    used = {Path(name).stem for _, name in v3.SOURCES}
    twins = {"motorcycle_right"}  # motorcycle_left's stereo pair: the same scene
    assert used and not used & (evaluated | twins)
    assert all(v3.source_path(*source).is_file() for source in v3.SOURCES)

    drawn: list[int] = []
    photo_background = v3.photo_background

    def counted(rng, w, h):
        drawn.append(1)
        return photo_background(rng, w, h)

    monkeypatch.setattr(v3, "photo_background", counted)
    images = [render_synthetic_image(image_rng(5, "test", i), "v3") for i in range(40)]
    assert 4 <= len(drawn) <= 20  # PHOTO_SHARE of 40 (re-rolled scenes draw again)
    again = render_synthetic_image(image_rng(5, "test", 3), "v3")
    np.testing.assert_array_equal(images[3][0], again[0])
    assert images[3][2] == again[2]
    for _, objects, captions in images:
        assert all(not grammar_errors(text) and is_world_sentence(text) for text in captions)
        assert all(o["area"] >= MIN_VISIBLE_PIXELS for o in objects)


def test_v3_photo_backgrounds_fill_the_canvas_in_range():
    from model.data.synth import backgrounds, v3

    assert v3.CAPTION_WORD in backgrounds.KINDS  # a v2 tokenizer knows the word
    rng = np.random.default_rng(0)
    for w, h in ((192, 384), (384, 192), (300, 300)):
        for _ in range(len(v3.SOURCES)):
            pixels, word = v3.photo_background(rng, w, h)
            assert pixels.shape == (h, w, 3) and pixels.dtype == np.float32
            assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.std() > 1
            assert word == v3.CAPTION_WORD


def test_v3_photo_crops_keep_the_canvas_aspect(monkeypatch):
    from model.data.synth import v3

    crops: list[tuple[tuple[int, int], tuple[float, float, float, float]]] = []
    resize = Image.Image.resize

    def recorded(self, size, resample=None, box=None, **kwargs):
        crops.append((self.size, box))
        return resize(self, size, resample, box, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    rng = np.random.default_rng(1)
    for w, h in ((192, 384), (384, 192), (300, 300), (384, 200)):
        for _ in range(30):
            v3.photo_background(rng, w, h)
            (sw, sh), (x0, y0, x1, y1) = crops[-1]
            assert 0 <= x0 < x1 <= sw + 1e-6 and 0 <= y0 < y1 <= sh + 1e-6
            assert (x1 - x0) / (y1 - y0) == pytest.approx(w / h, rel=1e-6)
            assert min(x1 - x0, y1 - y0) >= v3.MIN_CROP - 1e-6


def test_v3_without_its_source_images_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mad.cli import app
    from model.data.synth import v3

    monkeypatch.setattr(v3, "SOURCES", (*v3.SOURCES, ("skimage", "not-shipped.png")))
    v3._sources.cache_clear()
    try:
        result = CliRunner().invoke(
            app, ["data", "synth", "--world", "v3", "--out", str(tmp_path / "d"), "--train", "2"]
        )
    finally:
        v3._sources.cache_clear()
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mad data synth: world v3's source image ")
    assert "not-shipped.png is missing" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "d").exists()
