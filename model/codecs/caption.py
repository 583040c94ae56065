"""Caption: 6 prompt tokens + caption_len text tokens (cut or padded; text id 0 ends it).

Training: the fully masked sequence's target is whichever reference caption the prediction
is closest to (best-of-5, `TaskCodec.assign_targets`); each reference also gets a partly
masked sequence in which one shown token is swapped for a random word. Inference re-masks
random positions, not the least confident ones, and with `caption_candidates` refines that
many captions apart (each its own positions) and keeps the one the model finds most likely
through its end token (model.decoding). Metric: corpus BLEU-4 against every reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from model.codecs.base import (
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    register_codec,
)
from model.tokenizer import CaptionTokenizer

if TYPE_CHECKING:
    from model.evaluate import GroundTruth

REFERENCES = 5


@register_codec
class CaptionCodec(TaskCodec):
    name = "caption"
    random_remask = True
    output_field = "caption"
    # With a known caption language (a synthetic-world model), `mad eval` also reports the
    # share of captions that are its sentences and BLEU-4 times that share, which `mad tune`
    # then maximises: BLEU-4 alone rewards word soup that shares words with the truth.
    metrics = ("caption_BLEU4",)
    decoding_options: ClassVar[dict[str, tuple[Any, ...]]] = {"caption_candidates": (1, 2, 4, 8)}

    @property
    def metric(self) -> str:
        return "caption_BLEU4_x_sentences" if self._sentence_check() else "caption_BLEU4"

    def _sentence_check(self) -> Callable[[str], bool] | None:
        from model.data.synth.language import sentence_check

        return sentence_check(self.config.class_names)

    @property
    def prompt_len(self) -> int:
        return len(self.vocab.caption_prompt)

    @property
    def body_len(self) -> int:
        return self.config.caption_len

    def vocab_slice(self) -> tuple[int, int]:
        return self.vocab.text_start, self.vocab.text_stop

    def body_ranges(self) -> list[tuple[int, int]]:
        return [self.vocab_slice()] * self.body_len

    def prompts(self, source: int | torch.Tensor) -> torch.Tensor:
        """source: the batch size -> [B, 6]."""
        batch_size = self._prompt_batch_size(source)
        return torch.tensor([self.vocab.caption_prompt] * batch_size, dtype=torch.long)

    @property
    def text_tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer (a model with the caption task is built with one)."""
        if self.tokenizer is None:
            raise ValueError("the caption task needs a caption tokenizer; this model has none")
        return self.tokenizer

    def encode_text(self, text: str) -> torch.Tensor:
        ids = self.text_tokenizer.encode(text, self.config.caption_len)
        return self.vocab.text_token(torch.tensor(ids, dtype=torch.long))

    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        references: list[torch.Tensor] = []
        image_index: list[int] = []
        for b, target in enumerate(targets):
            captions = list(target.get("captions") or [])
            if not captions:
                continue
            captions = (captions * REFERENCES)[:REFERENCES]  # exactly 5 (COCO has 5 to 7)
            references.append(torch.stack([self.encode_text(c) for c in captions]))
            image_index.append(b)
        if not references:
            return TrainSequences.empty(self.seq_len)
        refs = torch.stack(references)  # [B', 5, L]
        n, L, P = len(refs), self.body_len, self.prompt_len
        prompt = self.prompts(n)
        # Fully masked: one sequence per image, five candidate targets.
        full_inputs = torch.cat([prompt, torch.full((n, L), self.vocab.mask)], 1)
        full_targets = torch.cat([prompt.unsqueeze(1).expand(-1, REFERENCES, -1), refs], 2)
        full_weights = torch.cat([torch.zeros(n, P), torch.ones(n, L)], 1)
        # Partly masked: one per reference, one shown token swapped for a random word.
        body = refs.flatten(0, 1)
        partial, masked = self.masked_copy(body, self.config.train_mask_ratio, generator)
        partial = self.swap_random_word(partial, ~masked, generator)
        part_prompt = self.prompts(len(body))
        part_inputs = torch.cat([part_prompt, partial], 1)
        part_targets = torch.cat([part_prompt, body], 1).unsqueeze(1).expand(-1, REFERENCES, -1)
        part_weights = torch.cat([torch.zeros(len(body), P), masked.float()], 1)
        index = torch.tensor(image_index)
        return TrainSequences(
            inputs=torch.cat([full_inputs, part_inputs]),
            targets=torch.cat([full_targets, part_targets]),
            weights=torch.cat([full_weights, part_weights]),
            image_index=torch.cat([index, index.repeat_interleave(REFERENCES)]),
        )

    def swap_random_word(
        self, body: torch.Tensor, shown: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Replace one shown token per row with a random (non-pad) word."""
        body = body.clone()
        scores = torch.rand(body.shape, generator=generator).masked_fill(~shown, -1.0)
        pos = scores.argmax(1)
        has_shown = shown.any(1)
        words = torch.randint(1, self.vocab.text_size, (len(body),), generator=generator)
        rows = torch.arange(len(body))[has_shown]
        body[rows, pos[has_shown]] = self.vocab.text_token(words[has_shown])
        return body

    @property
    def candidates(self) -> int:
        return self.config.caption_candidates

    def scored_positions(self, predicted: torch.Tensor) -> torch.Tensor:
        """A caption's words and its end token (text id 0); not the padding after it."""
        ends = (predicted == 0).cumsum(1)
        return (ends == 0) | ((ends == 1) & (predicted == 0))

    def decode(
        self,
        logits: torch.Tensor,
        prompts: torch.Tensor | None,
        contexts: list[DecodeContext],
        **_: Any,
    ) -> list[str]:
        """[B, L, V_text] -> one caption string per image (cut at the first end token)."""
        ids = logits.argmax(-1)  # local ids are text ids
        return [self.text_tokenizer.decode(row.tolist()) for row in ids]

    # --- response and metric ----------------------------------------------------------------
    def to_json(self, output: str, options: JsonOptions) -> str:
        return output

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        from model.evaluate import CaptionBLEU  # sacrebleu only when evaluating

        return CaptionBLEU(truth, self.name, "caption_BLEU4", self._sentence_check())
