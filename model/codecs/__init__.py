"""Task codecs: one file per task, all behind `TaskCodec`.

Every module in this package is imported here, so adding a task means adding one file whose
codec class carries `@register_codec` (a codec defined anywhere else only has to be imported
before the model is built).
"""

import importlib
import pkgutil

from model.codecs.base import (
    CODECS,
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    decoding_option_names,
    flip_options,
    register_codec,
    zoom_options,
)
from model.codecs.detection import DetectionCodec
from model.config import ModelConfig
from model.tokenizer import CaptionTokenizer
from model.vocab import VocabLayout

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_codecs(
    config: ModelConfig, vocab: VocabLayout, tokenizer: CaptionTokenizer | None = None
) -> dict[str, TaskCodec]:
    """The model's codecs, in the order its tasks run (config.tasks): detection before every
    task it prompts."""
    unknown = [t for t in config.tasks if t not in CODECS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {sorted(CODECS)}")
    codecs = {name: CODECS[name](config, vocab, tokenizer) for name in config.tasks}
    for position, (name, codec) in enumerate(codecs.items()):
        if codec.prompted_by_detections and DetectionCodec.name not in config.tasks[:position]:
            raise ValueError(
                f"{name} is prompted by detections: the model's tasks must list "
                f"{DetectionCodec.name!r} before it"
            )
    return codecs


__all__ = [
    "CODECS",
    "DecodeContext",
    "DetectionCodec",
    "JsonOptions",
    "TaskCodec",
    "TaskEvaluator",
    "TrainSequences",
    "build_codecs",
    "decoding_option_names",
    "flip_options",
    "register_codec",
    "zoom_options",
]
