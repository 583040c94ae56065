"""Caption tokenizer: a thin SentencePiece wrapper.

Text id 0 is both padding and end of sentence, so a caption is its pieces followed by zeros.
Models we train put <pad> at id 0; an existing model (e.g. the reference T5-derived one, whose
id 0 is also <pad>) loads unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from model.startup import StartupError

PAD_ID = 0
MODEL_TYPES = ("word", "unigram", "bpe")


def normalize(text: str) -> str:
    """What the tokenizer sees of a caption: stripped and lowercased (as the reference)."""
    return text.strip().lower()


class CaptionTokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """A SentencePiece model file; a StartupError naming it when it is missing or not one."""
        try:
            return cls(Path(path).read_bytes())
        except (OSError, RuntimeError) as exc:  # RuntimeError: sentencepiece cannot parse it
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StartupError(f"{path} is not a readable SentencePiece model ({problem})") from exc

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int = 256, model_type: str = "word"
    ) -> CaptionTokenizer:
        """Train on a caption corpus (vocab_size is an upper bound), lowercased as the
        reference does. model_type: "word" (default: caption corpora have a small closed
        vocabulary, and one token per word keeps 20 tokens enough for a sentence), "unigram"
        or "bpe" (subwords: no unknown words on an open vocabulary).
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer type must be one of {MODEL_TYPES}, not {model_type!r}")
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([normalize(c) for c in captions]),
            model_writer=buffer,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora have fewer pieces than asked for
            model_type=model_type,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return cls(buffer.getvalue())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece(self, text_id: int) -> str:
        return str(self._sp.id_to_piece(text_id))

    def encode(self, text: str, length: int) -> list[int]:
        """Text -> exactly `length` ids: its pieces, cut or padded with PAD_ID."""
        ids = [i for i in self._sp.encode(normalize(text)) if i != PAD_ID][:length]
        return ids + [PAD_ID] * (length - len(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, cut at the first PAD_ID (end of sentence)."""
        kept = []
        for i in ids:
            if int(i) == PAD_ID:
                break
            kept.append(int(i))
        return self._sp.decode(kept)
