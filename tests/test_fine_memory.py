"""The fine memory level (`fine_memory`): the decoder cross-attends to the backbone stage
before the last as well, at twice the resolution; training, warm starts and export."""

from __future__ import annotations

import pytest
import torch

from export.onnx_export import export_onnx
from mad.bench import train_step
from model.checkpoint import MAD, load_checkpoint, save_checkpoint
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import build_transforms
from model.losses import masked_training_losses, weighted_total
from model.train import train
from model.train_start import TrainConfig
from runtime.manifest import read_manifest
from tests.helpers import micro_config


@pytest.fixture(scope="module")
def fine_model(tokenizer) -> MAD:
    torch.manual_seed(0)
    return MAD.build(micro_config(fine_memory=True), tokenizer)


def test_memory_holds_both_levels_and_masks_their_padding(fine_model):
    network = fine_model.required_network().eval()
    assert network.backbone.strides == [8, 16]
    pad = torch.zeros(1, 96, 96, dtype=torch.bool)
    pad[:, :, 48:] = True  # the right half is letterbox padding
    with torch.inference_mode():
        memory = network.encode(torch.rand(1, 3, 96, 96), pad)
    coarse, fine = 6 * 6, 12 * 12
    assert memory.kv[0][0].shape[2] == coarse + fine
    assert memory.mask is not None
    attend = memory.mask[0, 0, 0]
    assert attend[:coarse].view(6, 6)[:, :3].all() and not attend[:coarse].view(6, 6)[:, 3:].any()
    assert (
        attend[coarse:].view(12, 12)[:, :6].all() and not attend[coarse:].view(12, 12)[:, 6:].any()
    )


def test_decoder_reads_the_fine_level(fine_model):
    """Moving the fine level's embedding (so its keys) changes the logits: the decoder
    attends to the fine tokens."""
    network = fine_model.required_network().eval()
    codec = fine_model.codecs["keypoints"]
    images = torch.rand(1, 3, 96, 96)
    tokens = torch.full((1, 8), fine_model.vocab.coord_start)
    with torch.inference_mode():
        before = network.decode(
            network.encode(images), tokens, torch.zeros(1, dtype=torch.long), codec.vocab_slice()
        )
        network.fine_level.add_(1.0)
        after = network.decode(
            network.encode(images), tokens, torch.zeros(1, dtype=torch.long), codec.vocab_slice()
        )
        network.fine_level.sub_(1.0)
    assert not torch.allclose(before, after)


def test_warm_start_adds_the_level_and_keeps_every_trained_weight(synth_data, tokenizer, tmp_path):
    torch.manual_seed(0)
    old = MAD.build(micro_config(), tokenizer)
    save_checkpoint(old, tmp_path / "old")
    cfg = TrainConfig(
        data=synth_data,
        out=tmp_path / "new",
        steps=2,
        batch_size=2,
        workers=0,
        warmup_steps=1,
        lr=0.0,
        init=tmp_path / "old",
        overrides={"fine_memory": True},
    )
    train(cfg)
    new, _ = load_checkpoint(tmp_path / "new")
    assert new.config.fine_memory
    state, old_state = new.required_network().state_dict(), old.required_network().state_dict()
    assert {"fine_level", "fine_proj.0.weight", "fine_proj.1.weight"} <= set(state)
    for key, value in old_state.items():
        if key != "token_embedding.weight" and "running" not in key and "batches" not in key:
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("bf16", [False, True])
def test_every_task_loss_trains_the_fine_level(fine_model, synth_data, bf16):
    """A training step's gradient reaches the fine projection and the level embedding, in
    fp32 and under the CPU bf16 autocast that training uses."""
    network = fine_model.required_network().train()
    dataset = CocoMultiTaskDataset(synth_data, "train2017", build_transforms(False, 96))
    batch = CanvasCollate(fine_model.config.image_size)([dataset[i] for i in range(2)])
    generator = torch.Generator().manual_seed(0)
    for name, codec in fine_model.codecs.items():
        sequences = {name: codec.training_sequences(batch[2], generator)}
        network.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = masked_training_losses(
                network, batch[0], batch[1], sequences, fine_model.codecs
            )
        loss = weighted_total(losses.terms, fine_model.config.task_weights)
        assert torch.isfinite(loss), name
        loss.backward()
        for param in (network.fine_level, network.fine_proj[0].weight):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    network.eval()


def test_onnx_export_of_a_fine_memory_model_matches_eager(fine_model, tmp_path):
    save_checkpoint(fine_model, tmp_path / "ckpt")
    export_onnx(tmp_path / "ckpt", tmp_path / "onnx")
    assert read_manifest(tmp_path / "onnx")["verification"]["max_abs_logit_diff"] < 1e-3


def test_train_step_bench_times_the_changed_model_against_the_checkpoint(
    micro_checkpoint, monkeypatch, capsys
):
    argv = ["train_step", "--checkpoint", str(micro_checkpoint), "--batch-size", "2"]
    argv += ["--steps", "1", "--set", "fine_memory=true", "--base-set", 'tasks=["detection"]']
    monkeypatch.setattr("sys.argv", argv)
    train_step.main()
    line = capsys.readouterr().out
    assert (
        'tasks=["detection"]' in line and "fine_memory=true takes" in line and "x as long" in line
    )
