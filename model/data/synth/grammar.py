"""A small checker of the synthetic captions' grammar: a/an before vowels, determiners and
numbers agreeing with the noun they govern, "there is/are", a subject before "is". Used by
the tests of world v2's captions and by the photo report on what a model writes."""

from __future__ import annotations

from model.data.synth.common import CATEGORIES

SINGULAR = set(CATEGORIES)
PLURAL = {"people", "objects", "shapes"} | {c + "s" for c in CATEGORIES[1:]}
NUMBERS = {"two", "three", "four", "five", "six", "seven", "eight", "no", "any"}  # + plural


def grammar_errors(caption: str) -> list[str]:
    """The agreement errors of a caption, e.g. ["a objects"]; [] when it reads well."""
    words, errors = caption.split(), []
    if not words:
        return ["empty caption"]
    if words[-1] in ("a", "an", "the", "and", "of", "in", "is", "are") or words[-1] in NUMBERS:
        errors.append(f"ends with {words[-1]!r}")
    for i, word in enumerate(words[:-1]):
        following = words[i + 1]
        if word in ("a", "an") and (word == "an") != (following[0] in "aeiou"):
            errors.append(f"{word} {following}")
        if word in ("a", "an") or word in NUMBERS:
            for nxt in words[i + 1 :]:
                if nxt in ("a", "an") or nxt in NUMBERS:
                    break
                if nxt in SINGULAR | PLURAL:
                    if (nxt in PLURAL) != (word in NUMBERS):
                        errors.append(f"{word} ... {nxt}")
                    break
        if word in ("is", "are") and i > 0 and words[i - 1] == "there":
            if (word == "is") != (following in ("a", "an")):
                errors.append(f"there {word} {following}")
        elif word == "is" and words[0] not in ("a", "an"):
            errors.append(f"{words[0]} ... is")
    return errors
