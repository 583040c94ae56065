"""Training speed paths: CPU bf16 autocast, the matmul attention it uses, wall-time stops and
deadline-paced schedules, and starting from a checkpoint with config overrides that add
parameters."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import MAD, load_checkpoint, save_checkpoint
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import build_transforms
from model.losses import masked_training_losses, weighted_total
from model.startup import StartupError
from model.train import train
from model.train_start import TrainConfig
from model.transformer import Attention, matmul_attention, matmuls_pay
from tests.helpers import MICRO_OVERRIDES, micro_config


@pytest.mark.parametrize("queries, keys", [(5, 7), (600, 500)])
def test_both_cpu_bf16_attention_paths_agree_with_fp32(queries, keys):
    """Short attention takes the matmuls, long the fused kernel (matmuls_pay): either way,
    under CPU bf16 autocast, close to the fp32 result."""
    torch.manual_seed(0)
    attention = Attention(32, 4, 0.0).eval()
    query, memory = torch.randn(2, queries, 32), torch.randn(2, keys, 32)
    mask = torch.rand(2, 1, 1, keys) > 0.3
    mask[..., 0] = True
    kv = attention.project_kv(memory, memory)
    expected = attention(query, kv, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(query, attention.project_kv(memory, memory), mask)
    assert matmuls_pay(queries, keys) == (queries * keys < 100_000)
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_matmul_attention_computes_what_sdpa_does():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True  # every query can attend somewhere
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(matmul_attention(q, k, v, mask, 0.0, False), expected, atol=1e-5)
    k, v = k[:, :, :5], v[:, :, :5]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(matmul_attention(q, k, v, None, 0.0, True), expected, atol=1e-5)


def _loss_and_grads(mad: MAD, batch, sequences, bf16: bool) -> tuple[float, torch.Tensor]:
    network = mad.required_network()
    network.zero_grad()
    images, pads, _ = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = masked_training_losses(network, images, pads, sequences, mad.codecs)
    loss = weighted_total(losses.terms, mad.config.task_weights)
    loss.backward()
    grads = [p.grad.flatten() for p in network.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads)


def test_bf16_cpu_training_step_stays_close_to_fp32(synth_data, tokenizer):
    torch.manual_seed(0)
    mad = MAD.build(micro_config(), tokenizer)
    mad.required_network().train()
    dataset = CocoMultiTaskDataset(synth_data, "train2017", build_transforms(False, 96))
    batch = CanvasCollate(mad.config.image_size)([dataset[i] for i in range(4)])
    generator = torch.Generator().manual_seed(0)
    sequences = {n: c.training_sequences(batch[2], generator) for n, c in mad.codecs.items()}
    loss32, grads32 = _loss_and_grads(mad, batch, sequences, bf16=False)
    loss16, grads16 = _loss_and_grads(mad, batch, sequences, bf16=True)
    assert abs(loss16 - loss32) / loss32 < 0.02
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.98


def micro_run(data: Path, out: Path, **changes: Any) -> TrainConfig:
    """A short run of the micro model, saving and evaluating only at its end."""
    return TrainConfig(
        data=data,
        out=out,
        batch_size=2,
        workers=0,
        save_every=100,
        eval_images=2,
        overrides=dict(MICRO_OVERRIDES),
        **changes,
    )


def test_training_stops_and_saves_after_its_wall_time(synth_data, tmp_path):
    cfg = micro_run(synth_data, tmp_path / "run", steps=50, warmup_steps=1, max_minutes=1e-6)
    train(cfg)
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 1  # stopped (and saved) after the first step, not at 50


@pytest.mark.parametrize("anneal", [False, True])
def test_a_deadline_paced_schedule_has_annealed_when_the_time_is_up(
    synth_data, tmp_path, monkeypatch, anneal
):
    # The clock, as shares of the budget spent after each step: the warmup's two steps are
    # not paced, the third step spends the rest.
    clock = iter([0.1, 0.2, 1.0])
    monkeypatch.setattr("model.train._time_spent", lambda *_: next(clock))
    cfg = micro_run(
        synth_data,
        tmp_path / "run",
        steps=1000,
        warmup_steps=2,
        lr=1e-3,
        backbone_lr_scale=1.0,
        log_every=1,
        max_minutes=10,
        anneal_by_deadline=anneal,
    )
    train(cfg)
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["lr"]]
    # The lr logged at a step is the next step's: the warmup's end (steps 1-2) either way,
    # then the cosine's floor once the time is up, else still near its peak.
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    lrs = [float(row["lr"]) / cfg.lr for row in rows]
    assert lrs[:2] == pytest.approx([1.0, 1.0])
    assert lrs[2] == pytest.approx(cfg.min_lr_scale if anneal else 1.0, abs=1e-4)
    assert all(0.0 <= float(row["data_wait"]) <= 1.0 for row in rows)
    if not anneal:
        return
    # Resumed, the run goes on where its schedule was (the floor), not where its steps were,
    # even with a longer schedule.
    clock = iter([0.5, 1.0])
    train(dataclasses.replace(cfg, resume=cfg.out, steps=3000, overrides=None))
    with open(tmp_path / "run" / "train_log.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["lr"]]
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4, 5]
    assert float(rows[3]["lr"]) / cfg.lr == pytest.approx(cfg.min_lr_scale, abs=1e-4)


def test_init_with_overrides_keeps_the_weights_and_adds_new_parameters(
    synth_data, tokenizer, tmp_path
):
    torch.manual_seed(0)
    old = MAD.build(dataclasses.replace(micro_config(), decoder_final_norm=False), tokenizer)
    save_checkpoint(old, tmp_path / "old")
    cfg = TrainConfig(
        data=synth_data,
        out=tmp_path / "new",
        steps=1,
        batch_size=2,
        workers=0,
        warmup_steps=1,
        lr=0.0,
        init=tmp_path / "old",
        overrides={"decoder_final_norm": True},
    )
    train(cfg)
    new, _ = load_checkpoint(tmp_path / "new")
    assert new.config.decoder_final_norm
    state = new.required_network().state_dict()
    assert "final_norm.weight" in state
    # The synthetic captions have words the old tokenizer (trained on TINY_CAPTIONS) lacks:
    # a new tokenizer was trained, and every piece both know kept its embedding.
    assert old.tokenizer is not None and new.tokenizer is not None
    assert new.tokenizer.vocab_size > old.tokenizer.vocab_size
    old_state = old.required_network().state_dict()
    for key, value in old_state.items():
        if key != "token_embedding.weight" and "running" not in key and "batches" not in key:
            assert torch.equal(value, state[key]), key  # (BatchNorm statistics move)
    old_rows, new_rows = old_state["token_embedding.weight"], state["token_embedding.weight"]
    old_pieces = {old.tokenizer.piece(i): i for i in range(old.tokenizer.vocab_size)}
    shared = 0
    for i in range(new.tokenizer.vocab_size):
        if new.tokenizer.piece(i) in old_pieces:
            j = old_pieces[new.tokenizer.piece(i)]
            assert torch.equal(new_rows[new.vocab.text_token(i)], old_rows[old.vocab.text_token(j)])
            shared += 1
    assert shared >= 10
    start = old.vocab.text_start  # specials, classes and coordinates keep their rows
    assert torch.equal(new_rows[:start], old_rows[:start])


def test_an_empty_validation_split_is_not_evaluated(tmp_path):
    from model.data.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", train=2, val=0, seed=0)
    cfg = TrainConfig(
        data=tmp_path / "data",
        out=tmp_path / "run",
        steps=1,
        batch_size=2,
        workers=0,
        warmup_steps=1,
        overrides=dict(MICRO_OVERRIDES),
    )
    train(cfg)
    log = (tmp_path / "run" / "train_log.csv").read_text()
    assert "val_" not in log  # no row of zero metrics from an empty split


def test_init_with_fewer_tasks_keeps_the_positions_they_share(synth_data, tokenizer, tmp_path):
    """Dropping the longest task shortens the position table: the rows both have carry over."""
    torch.manual_seed(0)
    old = MAD.build(micro_config(), tokenizer)
    save_checkpoint(old, tmp_path / "old")
    common = dict(data=synth_data, steps=1, batch_size=2, workers=0, warmup_steps=1, lr=0.0)
    overrides = {"tasks": ["detection", "keypoints"]}
    cfg = TrainConfig(out=tmp_path / "new", init=tmp_path / "old", overrides=overrides, **common)
    train(cfg)
    new, _ = load_checkpoint(tmp_path / "new")
    old_pos = old.required_network().seq_pos.weight
    new_pos = new.required_network().seq_pos.weight
    assert len(new_pos) < len(old_pos)
    assert torch.equal(new_pos, old_pos[: len(new_pos)])
    bad = TrainConfig(
        out=tmp_path / "bad", init=tmp_path / "old", overrides={"num_bins": 50}, **common
    )
    with pytest.raises(StartupError, match="coordinate bins"):
        train(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [({"n_heads": 3}, "divisible"), ({"bogus": 1}, "bogus"), ({"fine_memory": True}, "finer")],
)
def test_a_bad_set_is_a_startup_error(synth_data, tmp_path, overrides, message):
    if "fine_memory" in overrides:
        overrides = overrides | {"backbone": "timm:vit_tiny_patch16_224"}
    cfg = TrainConfig(data=synth_data, out=tmp_path / "run", steps=1, overrides=overrides)
    with pytest.raises(StartupError, match=message):
        train(cfg)


def test_train_step_bench_compares_sdpa_backends_on_changing_batches(
    micro_checkpoint, monkeypatch, capsys, tmp_path
):
    from mad.bench import train_step

    argv = ["train_step", "--checkpoint", str(micro_checkpoint), "--batch-size", "2"]
    argv += ["--batches", "2", "--steps", "1", "--sdpa", "math"]
    monkeypatch.setattr("sys.argv", [*argv, "--profile", str(tmp_path / "ops.txt")])
    train_step.main()
    line = capsys.readouterr().out
    assert "x 2 batches" in line and "SDPA math takes" in line
    assert "aten::" in (tmp_path / "ops.txt").read_text()
    monkeypatch.setattr("sys.argv", [*argv[:-1], "fastest"])
    with pytest.raises(SystemExit, match="unknown SDPA backend 'fastest'"):
        train_step.main()
