"""The synthetic worlds' caption language as one regular expression.

Every caption the v1, v2 and v3 generators write is a sentence of it (a test holds the
generators to that), built from the same words: noun phrases ("a red circle", "two people in
blue"), listings of up to three joined by "and", places, relations, poses, and the captions
of images without objects. A caption a model writes is a grammatical sentence of the world
when it matches and its articles and numbers agree (`grammar.grammar_errors`): "a person in
is is the top triangle" has no agreement error but is not a sentence.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

from model.config import SYNTH_CLASS_NAMES
from model.data.synth.backgrounds import KINDS
from model.data.synth.captions import NUMBER_WORDS, POSE_PHRASES
from model.data.synth.common import SHAPES
from model.data.synth.grammar import grammar_errors
from model.data.synth.paint import COLOUR_NAMES


def _any(*options: str) -> str:
    return "(?:" + "|".join(options) + ")"


def _words(words: list[str] | tuple[str, ...]) -> str:
    return _any(*(re.escape(w) for w in words))


@functools.cache
def _sentence() -> re.Pattern[str]:
    colour, background = _words(COLOUR_NAMES), _words(KINDS)
    shape, shapes = _words(SHAPES), _words([s + "s" for s in SHAPES])
    several = _words(NUMBER_WORDS[2:])
    # what follows "a single" / "just one", and the one-object noun phrase
    thing = _any(f"{colour} {shape}", f"person in {colour}")
    one = f"an? {thing}"
    group = _any(one, f"{several} {colour} {shapes}", f"{several} people in {colour}")
    listing = f"{group}(?: and {group}){{0,2}}"
    place = _any("at the (?:top|bottom)(?: left| right)?", "on the (?:left|right)", "in the middle")
    relation = _any("to the left of", "to the right of", "above", "below", "next to")
    pose = _words(list(POSE_PHRASES.values()))
    sentences = [
        # listings, on their own or framed
        f"(?:a picture of |an image with |a drawing of |there is |there are )?{listing}",
        f"{listing} on a {background} background",
        # one object's place, pose or relation to another
        f"{one} (?:is )?{place}",
        f"an? person in {colour} {pose}",
        f"{one} (?:is )?{relation} {one}",
        f"{several} objects including {group}",
        f"(?:a single|just one) {thing}",
        f"just one {thing} on a {background} background",
        # images without objects
        f"an? {background} background with no objects",
        f"an? {background} background and nothing else",
        "there are no objects in this picture",
        "an image without any objects",
        "a picture with no shapes and no people",
        f"no objects on a {background} background",
        "nothing but a background",
        f"an empty {background} background",
    ]
    return re.compile(_any(*sentences))


def is_world_sentence(caption: str) -> bool:
    """Whether `caption` (words separated by spaces) is a sentence of the caption language."""
    return _sentence().fullmatch(" ".join(caption.split())) is not None


def is_grammatical(caption: str) -> bool:
    """A sentence of the language whose articles and numbers agree."""
    return is_world_sentence(caption) and not grammar_errors(caption)


def sentence_check(class_names: Sequence[str]) -> Callable[[str], bool] | None:
    """How to tell a grammatical caption of a model with these classes: the synthetic
    world's models are held to its language; for other models there is no such check."""
    return is_grammatical if list(class_names) == SYNTH_CLASS_NAMES else None
