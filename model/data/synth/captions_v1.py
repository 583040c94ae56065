"""World v1 captions (also the source of the relation and place phrases v2 reuses): counts,
colours, shapes and a spatial relation."""

from __future__ import annotations

import numpy as np

NUMBER_WORDS = ["no", "a", "two", "three", "four", "five", "six", "seven", "eight"]
MAX_CAPTION_WORDS = 18


def _noun(category: str, n: int) -> str:
    if n == 1:
        return category
    return "people" if category == "person" else category + "s"


def _with_article(words: list[str]) -> str:
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _phrase(category: str, colour: str, n: int = 1) -> str:
    if category == "person":  # "a person in red" reads better than "a red person"
        return _with_article([NUMBER_WORDS[n], _noun(category, n), "in", colour])
    return _with_article([NUMBER_WORDS[n], colour, _noun(category, n)])


def _centre(obj: dict) -> tuple[float, float]:
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def relation_words(a: dict, b: dict) -> str:
    """Where a is relative to b, from box centres (image left/right, viewer's frame)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = ax - bx, ay - by
    near = 0.25 * (a["bbox"][2] + a["bbox"][3] + b["bbox"][2] + b["bbox"][3]) / 2
    if abs(dx) < near and abs(dy) < near:
        return "next to"
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def place_words(obj: dict, w: int, h: int) -> str:
    cx, cy = _centre(obj)
    col = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else ""
    row = "top" if cy < h / 3 else "bottom" if cy > 2 * h / 3 else ""
    if row:
        return f"at the {row} {col}".strip()
    return f"on the {col}" if col else "in the middle"


def make_captions(rng: np.random.Generator, objects: list[dict], w: int, h: int, bg: str) -> list:
    """Five captions naming counts, colours, shapes and one spatial relation."""
    # Groups of identical (category, colour), most salient (largest total area) first.
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["category"], obj["colour"]), []).append(obj)
    ranked = sorted(groups.items(), key=lambda kv: -sum(o["area"] for o in kv[1]))
    group_phrases = [_phrase(cat, col, len(objs)) for (cat, col), objs in ranked]
    by_area = sorted(objects, key=lambda o: -o["area"])
    a = by_area[0]
    a_text = _phrase(a["category"], a["colour"])

    def listing(prefix: str = "", suffix: str = "") -> str:
        # As many groups as fit the word budget (at most three), joined by "and".
        k = min(3, len(group_phrases))
        while True:
            text = " ".join(p for p in (prefix, " and ".join(group_phrases[:k]), suffix) if p)
            if k == 1 or len(text.split()) <= MAX_CAPTION_WORDS:
                return text
            k -= 1

    position = f"{a_text} {place_words(a, w, h)}"
    pool = [listing("a picture of"), listing(suffix=f"on a {bg} background")]
    pool.append(listing("an image with"))
    if len(by_area) > 1:
        b = by_area[1]
        b_text = _phrase(b["category"], b["colour"])
        relation = f"{a_text} {relation_words(a, b)} {b_text}"
        pool.append(f"{b_text} {relation_words(b, a)} {a_text}")
        pool.append(f"{NUMBER_WORDS[len(objects)]} objects including {group_phrases[0]}")
        pool.append(position)
    else:  # a lone object: its place in the image is the spatial fact
        relation = position
        pool.append(f"a single {a_text.split(' ', 1)[1]}")
    picks = rng.choice(len(pool), size=3, replace=False)
    return [listing(), relation, *(pool[int(i)] for i in sorted(picks))]
