"""Autoregressive baseline on the same network: causal self-attention, one token per pass.

This exists to measure MAD's speed claim side by side (the paper: 3953 ms autoregressive vs
137 ms parallel on the same R50 network). A MAD checkpoint is trained for masked decoding,
so the tokens this produces are not meaningful; the work per token is exactly that of an
autoregressive decoder of this size. With `use_cache`, each step runs only the new token
through the decoder against cached self-attention keys/values; without it every step
re-runs the whole prefix.
"""

from __future__ import annotations

import torch

from model.codecs import TaskCodec
from model.network import ImageMemory, MADNetwork


@torch.inference_mode()
def autoregressive_decode(
    network: MADNetwork,
    memory: ImageMemory,
    codec: TaskCodec,
    prompts: torch.Tensor,
    image_index: torch.Tensor,
    use_cache: bool = True,
) -> torch.Tensor:
    """prompts [S, P] -> generated body tokens [S, L], greedy, one token per decoder pass."""
    constraint = codec.constraint(prompts.device)
    vocab_slice = codec.vocab_slice()
    body = []
    if use_cache:
        memory = memory.select(image_index)
        logits, cache = network.decode_step(memory, prompts, 0, None, vocab_slice)
        for i in range(codec.body_len):
            token = codec.to_global((logits[:, -1] + constraint[i]).argmax(-1, keepdim=True))
            body.append(token)
            if i + 1 < codec.body_len:
                logits, cache = network.decode_step(
                    memory, token, prompts.shape[1] + i, cache, vocab_slice
                )
    else:
        tokens = prompts
        for i in range(codec.body_len):
            logits = network.decode(memory, tokens, image_index, vocab_slice, causal=True)
            token = codec.to_global((logits[:, -1] + constraint[i]).argmax(-1, keepdim=True))
            body.append(token)
            tokens = torch.cat([tokens, token], 1)
    return torch.cat(body, 1)
