"""World v2 captions: counts, colours, shapes, poses and a spatial relation in varied,
grammatical phrasings, and captions for images without objects that say so.

Five captions per image: the listing of what is there, one relation (or the place of a
lone object), and three picked from the other phrasings. Every article and verb agrees with
its noun ("a circle", "an orange star", "two people", "there are three squares").
"""

from __future__ import annotations

import numpy as np

from model.data.synth.captions_v1 import MAX_CAPTION_WORDS, place_words, relation_words

NUMBER_WORDS = ["no", "a", "two", "three", "four", "five", "six", "seven", "eight"]
POSE_PHRASES = {
    "standing": "is standing",
    "walking": "is walking",
    "sitting": "is sitting",
    "arms up": "is raising both arms",
    "arms out": "is holding both arms out",
}


def with_article(words: list[str]) -> str:
    """Join words, turning a leading "a" into "an" before a vowel sound."""
    if words[0] == "a" and words[1][0] in "aeiou":
        words = ["an", *words[1:]]
    return " ".join(words)


def noun(category: str, n: int) -> str:
    if n == 1:
        return category
    return "people" if category == "person" else category + "s"


def phrase(category: str, colour: str, n: int = 1) -> str:
    if category == "person":  # "a person in red" reads better than "a red person"
        return with_article([NUMBER_WORDS[n], noun(category, n), "in", colour])
    return with_article([NUMBER_WORDS[n], colour, noun(category, n)])


def _empty_captions(rng: np.random.Generator, bg: str) -> list[str]:
    pool = [
        with_article(["a", bg, "background", "and", "nothing", "else"]),
        "an image without any objects",
        "a picture with no shapes and no people",
        f"no objects on a {bg} background",
        "nothing but a background",
        f"an empty {bg} background",
    ]
    picks = rng.choice(len(pool), size=3, replace=False)
    return [
        f"a {bg} background with no objects",
        "there are no objects in this picture",
        *(pool[int(i)] for i in sorted(picks)),
    ]


def make_captions(rng: np.random.Generator, objects: list[dict], w: int, h: int, bg: str) -> list:
    """Five captions for the visible `objects` of a w x h image on a `bg` background."""
    if not objects:
        return _empty_captions(rng, bg)
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["category"], obj["colour"]), []).append(obj)
    ranked = sorted(groups.items(), key=lambda kv: -sum(o["area"] for o in kv[1]))
    group_phrases = [phrase(cat, col, len(objs)) for (cat, col), objs in ranked]
    first_is_single = len(ranked[0][1]) == 1
    by_area = sorted(objects, key=lambda o: -o["area"])
    a = by_area[0]
    a_text = phrase(a["category"], a["colour"])

    def listing(prefix: str = "", suffix: str = "") -> str:
        # As many groups as fit the word budget (at most three), joined by "and".
        k = min(3, len(group_phrases))
        while True:
            text = " ".join(p for p in (prefix, " and ".join(group_phrases[:k]), suffix) if p)
            if k == 1 or len(text.split()) <= MAX_CAPTION_WORDS:
                return text
            k -= 1

    position = place_words(a, w, h)
    pool = [
        listing("a picture of"),
        listing("an image with"),
        listing("a drawing of"),
        listing(suffix=f"on a {bg} background"),
        listing("there is" if first_is_single else "there are"),
        f"{a_text} is {position}",
    ]
    if a["category"] == "person" and "pose" in a:
        pool.append(f"{a_text} {POSE_PHRASES[a['pose']]}")
    if len(by_area) > 1:
        b = by_area[1]
        b_text = phrase(b["category"], b["colour"])
        relation = f"{a_text} {relation_words(a, b)} {b_text}"
        pool.append(f"{b_text} is {relation_words(b, a)} {a_text}")
        pool.append(f"{NUMBER_WORDS[len(objects)]} objects including {group_phrases[0]}")
    else:  # a lone object: its place in the image is the spatial fact
        relation = f"{a_text} {position}"
        rest = a_text.split(" ", 1)[1]
        pool.append(f"a single {rest}")
        pool.append(f"just one {rest} on a {bg} background")
    picks = rng.choice(len(pool), size=3, replace=False)
    return [listing(), relation, *(pool[int(i)] for i in sorted(picks))]
