"""Carry a trained model's weights into a changed one: config fields that add parameters
(e.g. `decoder_final_norm`) or a new caption tokenizer (captions with words the old one
did not know). Token embeddings move by meaning, not by index: specials, classes,
coordinates and task ids by their place in the layout, text tokens by their piece."""

from __future__ import annotations

from model.checkpoint import MAD
from model.vocab import VocabLayout


def unknown_word_share(mad: MAD, captions: list[str]) -> float:
    """Share of the captions with a piece `mad`'s tokenizer maps to unknown (1.0 without a
    tokenizer)."""
    if mad.tokenizer is None:
        return 1.0
    if not captions:
        return 0.0
    length = 4 * mad.config.caption_len
    unknown = sum(UNKNOWN_ID in mad.tokenizer.encode(c, length) for c in captions)
    return unknown / len(captions)


UNKNOWN_ID = 1  # CaptionTokenizer.train's unk_id


def carry_weights(source: MAD, target: MAD) -> list[str]:
    """Copy `source`'s parameters into `target` wherever they mean the same thing; -> names of
    the target parameters (or token rows) that keep their fresh initialisation."""
    old_net, new_net = source.required_network(), target.required_network()
    old_state, new_state = old_net.state_dict(), new_net.state_dict()
    fresh = [name for name in new_state if name not in old_state]
    unexpected = [name for name in old_state if name not in new_state]
    if unexpected:
        raise ValueError(f"the changed model drops trained weights: {unexpected[:5]}")
    for name, value in old_state.items():
        if name == "token_embedding.weight":
            continue
        if name == "seq_pos.weight" and value.shape[1:] == new_state[name].shape[1:]:
            # positions mean the same in a longer or shorter table
            kept = min(len(value), len(new_state[name]))
            new_state[name] = new_state[name].clone()
            new_state[name][:kept] = value[:kept]
            if kept < len(new_state[name]):
                fresh.append(f"seq_pos rows {kept}..{len(new_state[name]) - 1}")
            continue
        if new_state[name].shape != value.shape:
            shapes = f"{tuple(value.shape)} -> {tuple(new_state[name].shape)}"
            raise ValueError(f"{name}: the change reshapes trained weights: {shapes}")
        new_state[name] = value
    rows, new_text = _token_rows(source, target)
    embedding = new_state["token_embedding.weight"].clone()
    old_embedding = old_state["token_embedding.weight"]
    for new_id, old_id in rows.items():
        embedding[new_id] = old_embedding[old_id]
    new_state["token_embedding.weight"] = embedding
    new_net.load_state_dict(new_state)
    return fresh + ([f"token_embedding rows of {new_text} new text pieces"] if new_text else [])


def _token_rows(source: MAD, target: MAD) -> tuple[dict[int, int], int]:
    """-> (new id -> old id for every token with a counterpart, text pieces without one)."""
    old, new = source.vocab, target.vocab
    if (old.num_classes, old.num_bins) != (new.num_classes, new.num_bins):
        raise ValueError("carrying weights needs the same classes and coordinate bins")
    rows = {i: i for i in range(old.text_start)}  # specials, classes, coordinates, flags
    rows |= _task_rows(old, new)
    new_text = 0
    old_ids = _piece_ids(source)
    for piece, new_id in _piece_ids(target).items():
        if piece in old_ids:
            rows[new.text_token(new_id)] = old.text_token(old_ids[piece])
        else:
            new_text += 1
    return rows, new_text


def _task_rows(old: VocabLayout, new: VocabLayout) -> dict[int, int]:
    rows: dict[int, int] = {}
    for task, count in new.task_tokens:
        if dict(old.task_tokens).get(task) == count:
            new_start, old_start = new.task_range(task)[0], old.task_range(task)[0]
            rows |= {new_start + i: old_start + i for i in range(count)}
    return rows


def _piece_ids(mad: MAD) -> dict[str, int]:
    tokenizer = mad.tokenizer
    if tokenizer is None:
        return {}
    return {tokenizer.piece(i): i for i in range(tokenizer.vocab_size)}
