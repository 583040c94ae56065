"""Task codecs: one file per task, all behind `TaskCodec`.

Every module in this package is imported here, so adding a task means adding one file whose
codec class carries `@register_codec`.
"""

import importlib
import pkgutil

from model.codecs.base import CODECS, DecodeContext, TaskCodec, TrainSequences, register_codec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_codecs(config, vocab, tokenizer=None) -> dict[str, TaskCodec]:
    """The model's codecs, in the order its tasks run (config.tasks)."""
    unknown = [t for t in config.tasks if t not in CODECS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(CODECS)}")
    return {name: CODECS[name](config, vocab, tokenizer) for name in config.tasks}


__all__ = ["CODECS", "DecodeContext", "TaskCodec", "TrainSequences", "build_codecs",
           "register_codec"]
