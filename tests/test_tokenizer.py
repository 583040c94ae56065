"""The caption tokenizer: sized for the data (COCO-scale vocabularies), lowercased, and
whichever SentencePiece model type is asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mad.bench.workload import word
from model.config import get_preset
from model.tokenizer import CaptionTokenizer
from model.train_start import TrainConfig, tokenizer_for

WORDS = [word(i) for i in range(400)]  # more distinct words than the bundled model's 256
CAPTIONS = [" ".join(WORDS[i : i + 8]) for i in range(0, len(WORDS), 4)]


@dataclass
class CaptionSet:
    """What tokenizer_for reads of a dataset."""

    captions_by_image: list[list[str]] = field(default_factory=lambda: [[c] for c in CAPTIONS])

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.captions_by_image)))

    def captions(self, image_id: int) -> list[str]:
        return self.captions_by_image[image_id]


def test_word_tokenizer_round_trips_a_large_vocabulary():
    tokenizer = CaptionTokenizer.train(CAPTIONS, 1000)
    assert tokenizer.vocab_size > 400
    for text in CAPTIONS[:20]:
        assert tokenizer.decode(tokenizer.encode(text, 8)) == text


def test_captions_are_lowercased_in_training_and_encoding():
    tokenizer = CaptionTokenizer.train([c.upper() for c in CAPTIONS], 1000)
    text = CAPTIONS[3]
    assert tokenizer.encode(text.title(), 8) == tokenizer.encode(text, 8)
    assert tokenizer.decode(tokenizer.encode(text.upper(), 8)) == text


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_subword_tokenizers(model_type):
    tokenizer = CaptionTokenizer.train(CAPTIONS, 300, model_type)
    assert tokenizer.decode(tokenizer.encode(CAPTIONS[0], 20)) == CAPTIONS[0]


def test_unknown_tokenizer_type_is_refused():
    with pytest.raises(ValueError, match="tokenizer type must be one of"):
        CaptionTokenizer.train(CAPTIONS, 300, "chars")


def test_training_sizes_the_tokenizer_from_the_config(tmp_path: Path):
    """No --text-vocab-size: the preset's size (r50: the reference's 11421) bounds it, so all
    400 words get their own piece; an explicit size wins."""
    preset = get_preset("r50")
    cfg = TrainConfig(data=tmp_path, out=tmp_path / "a")
    cfg.out.mkdir()
    assert tokenizer_for(CaptionSet(), cfg, preset, rank=0).vocab_size > 400
    small = TrainConfig(data=tmp_path, out=tmp_path / "b", text_vocab_size=100)
    small.out.mkdir()
    assert tokenizer_for(CaptionSet(), small, preset, rank=0).vocab_size <= 100
