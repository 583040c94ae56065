"""The MAD network: backbone + encoder encode the image once; a shared decoder turns masked
token sequences of any task into logits over that task's slice of the vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import build_backbone
from model.config import ModelConfig
from model.folding import ImageGroups
from model.position import sine_position_encoding
from model.transformer import KV, DecoderLayer, EncoderLayer
from model.vocab import VocabLayout


@dataclass
class ImageMemory:
    """The encoded images, ready for decoding.

    kv:   per decoder layer, cross-attention (keys, values), each [B, heads, N, head_dim]
    mask: [B, 1, 1, N] True where a feature is real image (not padding), or None
    """

    kv: list[KV]
    mask: torch.Tensor | None

    def select(self, image_index: torch.Tensor) -> ImageMemory:
        """The memory each sequence attends to ([S] image index). A batch of one image is
        kept as is, shared by every sequence without a copy."""
        if self.kv[0][0].shape[0] == 1:
            return self
        kv = [(k.index_select(0, image_index), v.index_select(0, image_index)) for k, v in self.kv]
        mask = None if self.mask is None else self.mask.index_select(0, image_index)
        return ImageMemory(kv, mask)

    def split(self) -> list[ImageMemory]:
        """One memory per image, each a copy (a view would keep the whole batch alive)."""
        images = self.kv[0][0].shape[0]
        return [
            ImageMemory(
                [(k[i : i + 1].clone(), v[i : i + 1].clone()) for k, v in self.kv],
                None if self.mask is None else self.mask[i : i + 1].clone(),
            )
            for i in range(images)
        ]

    @staticmethod
    def join(parts: list[ImageMemory]) -> ImageMemory:
        """Memories of images of one canvas -> one batch, in this order."""
        kv = [
            (torch.cat([p.kv[layer][0] for p in parts]), torch.cat([p.kv[layer][1] for p in parts]))
            for layer in range(len(parts[0].kv))
        ]
        shape = next((p.mask for p in parts if p.mask is not None), None)
        if shape is None:
            return ImageMemory(kv, None)
        # An image without a mask has no padding: every feature is real.
        masks = [torch.ones_like(shape) if p.mask is None else p.mask for p in parts]
        return ImageMemory(kv, torch.cat(masks))

    def nbytes(self) -> int:
        tensors = [t for pair in self.kv for t in pair]
        if self.mask is not None:
            tensors.append(self.mask)
        return sum(t.numel() * t.element_size() for t in tensors)


class VocabularyHead(nn.Module):
    """2-layer MLP, L2-normalised, cosine similarity with the (normalised) token embeddings,
    times a learned temperature; computed only over the requested vocabulary slice."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """hidden [..., D], embeddings [V, D] -> logits [..., V], float32 even under autocast:
        cosines times a scale near 100 would lose a whole logit unit to bf16 rounding."""
        h = self.mlp(hidden)
        with torch.autocast(h.device.type, enabled=False):
            h = F.normalize(h.float(), dim=-1)
            scale = self.logit_scale.float().clamp(max=math.log(100.0)).exp()
            return scale * h @ F.normalize(embeddings.float(), dim=-1).t()


def coordinate_code(num_tokens: int, dim: int) -> torch.Tensor:
    """[num_tokens, dim] sine code of positions 0..1 (log-spaced frequencies), scaled to the
    norm of an N(0, 1) row so it sits among the other embeddings."""
    position = torch.linspace(0, 1, num_tokens).unsqueeze(1)
    freqs = math.pi * torch.logspace(0, math.log10(max(num_tokens / 2, 2)), dim // 2)
    angles = position * freqs
    code = torch.cat([angles.sin(), angles.cos()], 1)
    return F.pad(code, (0, dim - code.shape[1])) * math.sqrt(2)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _tokens(
    features: torch.Tensor, pad_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features [B, D, h, w], pad_mask [B, H, W] (True on letterbox padding) or None ->
    tokens [B, h*w, D], their sine positions [B, h*w, D], attend [B, 1, 1, h*w] (True where
    a feature is real image)."""
    B, D, h, w = features.shape
    if pad_mask is None:
        pad_mask = torch.zeros(B, h, w, dtype=torch.bool, device=features.device)
    else:
        pad_mask = F.interpolate(pad_mask[:, None].float(), size=(h, w))[:, 0] > 0.5
    pos = sine_position_encoding(pad_mask, D).to(features.dtype).flatten(2).transpose(1, 2)
    attend = (~pad_mask).flatten(1)[:, None, None, :]
    return features.flatten(2).transpose(1, 2), pos, attend


class MADNetwork(nn.Module):
    pixel_mean: torch.Tensor  # buffers: [1, 3, 1, 1] ImageNet normalisation
    pixel_std: torch.Tensor

    def __init__(self, config: ModelConfig, vocab: VocabLayout, max_seq_len: int):
        super().__init__()
        d = config.d_model
        self.config, self.vocab = config, vocab
        self.backbone = build_backbone(config)
        self.input_proj = nn.Conv2d(self.backbone.channels[-1], d, kernel_size=1)
        if config.fine_memory:
            # The fine level skips the encoder (its self-attention would cost 16x the coarse
            # level's); LayerNorm brings it to the encoder output's scale, the level embedding
            # (normal init, as Deformable DETR's) tells its keys from the coarse ones.
            self.fine_proj = nn.Sequential(
                nn.Conv2d(self.backbone.channels[0], d, kernel_size=1), ChannelNorm(d)
            )
            self.fine_level = nn.Parameter(torch.randn(d))
        self.encoder = nn.ModuleList(
            EncoderLayer(d, config.n_heads, config.ffn_dim, config.dropout)
            for _ in range(config.encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d, config.n_heads, config.ffn_dim, config.dropout)
            for _ in range(config.decoder_layers)
        )
        # One LayerNorm shared by every decoder layer's output on its way to the head (the
        # reference's post_norm_layer); configs from before it existed run without it.
        self.final_norm = nn.LayerNorm(d) if config.decoder_final_norm else nn.Identity()
        self.token_embedding = nn.Embedding(vocab.size, d)
        self.seq_pos = nn.Embedding(max_seq_len, d)  # shared by every task, truncated per task
        self.head = VocabularyHead(d)
        # Both keep nn.Embedding's N(0, 1) init, like DETR's queries: in a post-norm decoder,
        # positions initialised small are drowned by the unit-scale activations. Coordinate
        # tokens instead start from a sine code of their bin: with the cosine head, random
        # (near-orthogonal) rows make every wrong bin equally wrong and coordinates learn
        # very slowly; similar neighbours give smooth distributions from the first step.
        with torch.no_grad():
            coords = self.token_embedding.weight[vocab.coord_start : vocab.coord_stop]
            coords.copy_(coordinate_code(len(coords), d))
        self.register_buffer(
            "pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False
        )

    # --- image ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, pad_mask: torch.Tensor | None = None) -> ImageMemory:
        """images [B, 3, H, W] float in [0, 1]; pad_mask [B, H, W] True on letterbox padding."""
        x = (images - self.pixel_mean) / self.pixel_std
        maps = self.backbone(x)
        memory, pos, attend = _tokens(self.input_proj(maps[-1]), pad_mask)
        for layer in self.encoder:
            memory = layer(memory, pos, attend)
        if self.config.fine_memory:
            fine, fine_pos, fine_attend = _tokens(self.fine_proj(maps[0]), pad_mask)
            memory = torch.cat([memory, fine], 1)
            pos = torch.cat([pos, fine_pos + self.fine_level.to(fine_pos.dtype)], 1)
            attend = torch.cat([attend, fine_attend], 3)
        layers = cast(list[DecoderLayer], list(self.decoder))  # nn.ModuleList is not generic
        return ImageMemory([layer.image_kv(memory, pos) for layer in layers], attend)

    def forward(
        self,
        images: torch.Tensor,
        pad_mask: torch.Tensor,
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
    ) -> dict[str, torch.Tensor]:
        """Training pass: encode the images once, decode every task's sequences against them.

        sequences: task -> (tokens [S, T], image_index [S], vocab slice)
        returns:   task -> logits of every decoder layer [layers, S, T, V_slice]
        """
        memory = self.encode(images, pad_mask)
        return {
            name: self.decode(memory, tokens, index, vocab_slice, all_layers=True)
            for name, (tokens, index, vocab_slice) in sequences.items()
        }

    # --- sequences --------------------------------------------------------------------------
    def decode(
        self,
        memory: ImageMemory,
        tokens: torch.Tensor,
        image_index: torch.Tensor,
        vocab_slice: tuple[int, int],
        all_layers: bool = False,
        causal: bool = False,
        fold: bool = True,
        groups: ImageGroups | None = None,
    ) -> torch.Tensor:
        """tokens [S, T] (full-vocabulary ids) of sequences of images `image_index` [S] ->
        logits [S, T, V_slice], or [layers, S, T, V_slice] with all_layers (auxiliary losses).

        fold: cross-attend per image with the sequences folded (model.folding), else per
        sequence with each sequence's copy of its image (shapes independent of the data,
        which is what graph export needs). groups: a precomputed folded layout (CUDA graph
        capture cannot count sequences per image on the host)."""
        if groups is None and fold:
            groups = ImageGroups.of(image_index, memory.kv[0][0].shape[0])
        elif groups is None:
            memory = memory.select(image_index)
        x = self.token_embedding(tokens)
        pos = self.seq_pos.weight[: tokens.shape[1]]
        hidden = []
        for layer, kv in zip(self.decoder, memory.kv, strict=True):
            x, _ = layer(x, pos, kv, memory.mask, causal=causal, groups=groups)
            hidden.append(self.final_norm(x))
        embeddings = self.token_embedding.weight[vocab_slice[0] : vocab_slice[1]]
        if all_layers:
            return self.head(torch.stack(hidden), embeddings)
        return self.head(hidden[-1], embeddings)

    def decode_step(
        self,
        memory: ImageMemory,
        tokens: torch.Tensor,
        start: int,
        cache: list[KV] | None,
        vocab_slice: tuple[int, int],
    ) -> tuple[torch.Tensor, list[KV]]:
        """Autoregressive step with a self-attention key/value cache: new tokens [S, t] at
        positions start.. -> (logits [S, t, V_slice], updated cache). The first call (no
        cache) runs the prompt causally; later calls attend to all cached tokens."""
        x = self.token_embedding(tokens)
        pos = self.seq_pos.weight[start : start + tokens.shape[1]]
        new_cache = []
        for i, (layer, image_kv) in enumerate(zip(self.decoder, memory.kv, strict=True)):
            x, kv = layer(
                x,
                pos,
                image_kv,
                memory.mask,
                causal=cache is None,
                self_cache=None if cache is None else cache[i],
            )
            new_cache.append(kv)
        embeddings = self.token_embedding.weight[vocab_slice[0] : vocab_slice[1]]
        return self.head(self.final_norm(x), embeddings), new_cache
