"""The network, masked training and masked decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from model.autoregressive import autoregressive_decode
from model.checkpoint import MAD, load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, get_preset
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.synth import write_synthetic_dataset
from model.data.transforms import build_transforms
from model.decoding import mask_schedule, masked_decode
from model.inference_io import Request
from model.losses import masked_training_losses, sequence_loss, weighted_total
from model.matcher import match_slots
from model.pipeline import Pipeline
from runtime.torch_runner import TorchRunner
from tests.helpers import ALL_TASKS, micro_config


def fake_targets(config, n_images=2):
    H, W = config.image_size
    targets = []
    for b in range(n_images):
        masks = torch.zeros(2, H, W, dtype=torch.bool)
        masks[0, 10:40, 20:60] = True
        masks[1, 50:90, 30:50] = True
        keypoints = torch.rand(2, 17, 3)
        keypoints[..., 2] = 2
        keypoints[0, :5, 2] = 0
        targets.append(
            {
                "boxes": torch.tensor(
                    [[20 / W, 10 / H, 60 / W, 40 / H], [30 / W, 50 / H, 50 / W, 90 / H]]
                ),
                "labels": torch.tensor([0, b + 1]),  # class 0 is the person
                "masks": masks,
                "keypoints": keypoints,
                "captions": ["a red circle to the left of a blue square"] * 5,
            }
        )
    return targets


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trips_through_json(preset):
    config = get_preset(preset)
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "preset,size", [("tiny", 64), ("r50", 64), ("swin-b", 224), ("vit-b", 224)]
)
def test_every_preset_encodes_and_decodes_every_task(preset, size, tokenizer):
    torch.manual_seed(0)
    mad = MAD.build(get_preset(preset, image_size=(size, size)), tokenizer)
    network = mad.network.eval()
    with torch.inference_mode():
        memory = network.encode(
            torch.rand(2, 3, size, size), torch.zeros(2, size, size, dtype=torch.bool)
        )
        for name, codec in mad.codecs.items():
            tokens = torch.full((3, codec.seq_len), mad.vocab.mask)
            logits = network.decode(memory, tokens, torch.tensor([0, 1, 1]), codec.vocab_slice())
            start, stop = codec.vocab_slice()
            assert logits.shape == (3, codec.seq_len, stop - start), name
            assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    d = mad.config.d_model
    k = memory.kv[0][0]
    assert (
        k.shape[0] == 2 and k.shape[1] * k.shape[3] == d and len(memory.kv) == len(network.decoder)
    )


@pytest.mark.parametrize(
    "backbone, fine",
    [
        ("timm:vit_tiny_patch16_224", False),
        ("timm:swin_tiny_patch4_window7_224", False),
        ("timm:swin_tiny_patch4_window7_224", True),
        ("resnet18", True),
    ],
)
def test_backbones_take_canvases_off_their_patch_grid(backbone, fine, tokenizer):
    """COCO canvases (800x1333 and its transpose) are no multiple of 16 or 32: every backbone
    must still encode them, each memory level covering the whole image."""
    config = get_preset(
        "tiny", backbone=backbone, image_size=(100, 167), fine_memory=fine, backbone_last_stage=3
    )
    network = MAD.build(config, tokenizer).network.eval()
    assert len(network.backbone.strides) == (2 if fine else 1)
    for height, width in ((100, 167), (167, 100)):
        with torch.inference_mode():
            memory = network.encode(
                torch.rand(1, 3, height, width), torch.zeros(1, height, width, dtype=torch.bool)
            )
        cells = sum(
            math.ceil(height / stride) * math.ceil(width / stride)
            for stride in network.backbone.strides
        )
        assert memory.kv[0][0].shape[2] == cells, (backbone, height, width)


def test_fine_memory_needs_a_finer_stage(tokenizer):
    with pytest.raises(ValueError, match="no finer stage"):
        MAD.build(
            get_preset("tiny", backbone="timm:vit_tiny_patch16_224", fine_memory=True), tokenizer
        )


def test_loss_counts_only_masked_tokens(micro_model):
    torch.manual_seed(0)
    codec = micro_model.codecs["segmentation"]
    g = torch.Generator().manual_seed(0)
    seqs = codec.training_sequences(fake_targets(micro_model.config), g)
    network = micro_model.network.eval()
    with torch.no_grad():
        memory = network.encode(torch.rand(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=bool))
        logits = network.decode(
            memory, seqs.inputs, seqs.image_index, codec.vocab_slice(), all_layers=True
        )
    before = sequence_loss(logits, seqs, codec)
    shown = seqs.weights == 0
    # Flip every shown token's target: the loss must not move.
    fg, bg = micro_model.vocab.foreground, micro_model.vocab.background
    flipped = torch.where(seqs.targets[:, 0] == fg, bg, fg)
    seqs.targets[:, 0] = torch.where(shown, flipped, seqs.targets[:, 0])
    assert torch.allclose(sequence_loss(logits, seqs, codec), before)
    # ...while changing a masked token's target does.
    masked = (~shown).nonzero()[0]
    seqs.targets[masked[0], 0, masked[1]] = flipped[masked[0], masked[1]]
    assert not torch.allclose(sequence_loss(logits, seqs, codec), before)


def test_hungarian_matching_is_optimal_not_greedy():
    # Slot 0 fits object 0 best (cost 1 vs 2), but then slot 1 must take object 1 at cost 10.
    # The optimum is slot 0 -> object 1 (3), slot 1 -> object 0 (1): total 4 < 11.
    cost = torch.tensor([[1.0, 3.0], [1.0, 10.0]])  # [slot, object]
    V = 4
    objects = torch.tensor([[[0] * 5, [1] * 5]])  # object j is token j in every position
    log_probs = torch.full((1, 2, 5, V), -50.0)
    log_probs[0, :, :, 0] = -cost[:, 0, None]
    log_probs[0, :, :, 1] = -cost[:, 1, None]
    shown = torch.zeros(1, 2, 5, dtype=torch.bool)
    seqs, slots, objs = match_slots(
        log_probs, torch.zeros(1, 2, 5, dtype=torch.long), shown, objects, torch.tensor([2])
    )
    assert seqs.tolist() == [0, 0]
    assert dict(zip(slots.tolist(), objs.tolist(), strict=True)) == {0: 1, 1: 0}


def test_matching_respects_shown_tokens():
    V = 4
    log_probs = torch.full((1, 2, 5, V), -1.0)
    objects = torch.tensor([[[2] * 5]])
    inputs = torch.zeros(1, 2, 5, dtype=torch.long)
    inputs[0, 1] = 2  # slot 1 shows the object's tokens: it must be matched there
    shown = torch.zeros(1, 2, 5, dtype=torch.bool)
    shown[0, :, :2] = True
    seqs, slots, objs = match_slots(log_probs, inputs, shown, objects, torch.tensor([1]))
    assert seqs.tolist() == [0] and slots.tolist() == [1] and objs.tolist() == [0]


def test_matching_indexes_every_sequence_in_order():
    """Sequences without objects add no pair; the others' pairs are labelled with their
    sequence, in sequence order, each the optimum of its own costs."""
    V = 4
    log_probs = torch.full((3, 2, 5, V), -50.0)
    log_probs[0, 1, :, 3] = -1.0  # sequence 0: slot 1 fits its one object (token 3)
    log_probs[2, 0, :, 1] = -1.0  # sequence 2: slot 0 fits object 1 (token 1) ...
    log_probs[2, 1, :, 0] = -1.0  # ... slot 1 object 0 (token 0)
    objects = torch.tensor([[[3] * 5, [0] * 5], [[0] * 5, [0] * 5], [[0] * 5, [1] * 5]])
    shown = torch.zeros(3, 2, 5, dtype=torch.bool)
    inputs = torch.zeros(3, 2, 5, dtype=torch.long)
    seqs, slots, objs = match_slots(log_probs, inputs, shown, objects, torch.tensor([1, 0, 2]))
    assert list(zip(seqs.tolist(), slots.tolist(), objs.tolist(), strict=True)) == [
        (0, 1, 0),
        (2, 0, 1),
        (2, 1, 0),
    ]


def test_k0_is_a_single_pass(micro_model):
    runner = TorchRunner(micro_model.network)
    images = torch.rand(1, 3, 96, 96)
    memory = runner.encode(images, torch.zeros(1, 96, 96, dtype=torch.bool))
    codec = micro_model.codecs["caption"]
    prompts, index = codec.prompts(1), torch.zeros(1, dtype=torch.long)
    body = torch.full((1, codec.body_len), micro_model.vocab.mask)
    single = runner.decode(memory, torch.cat([prompts, body], 1), index, codec.vocab_slice())
    decoded = masked_decode(runner, memory, codec, prompts, index, [])
    assert torch.equal(decoded, single[:, codec.prompt_len :] + codec.constraint())
    refined = masked_decode(runner, memory, codec, prompts, index, [0.8, 0.4])
    assert not torch.equal(refined, decoded)


def test_mask_schedule_uses_the_default_or_a_ramp():
    assert mask_schedule(0, [0.8, 0.6, 0.4]) == []
    assert mask_schedule(3, [0.8, 0.6, 0.4]) == [0.8, 0.6, 0.4]
    assert mask_schedule(2, [0.8, 0.6, 0.4]) == [0.8, 0.4]
    assert mask_schedule(1, []) == [0.7]


def test_decoding_is_deterministic_in_eval_mode(micro_model):
    pipeline = Pipeline(micro_model, TorchRunner(micro_model.network))
    image = Image.effect_noise((120, 90), 60).convert("RGB")
    request = Request(image, ALL_TASKS, {"caption": 3, "keypoints": 2}, 0.0, None)
    first, second = pipeline([request])[0], pipeline([request])[0]
    assert torch.equal(first.detections.boxes, second.detections.boxes)
    assert torch.equal(first.detections.scores, second.detections.scores)
    assert first.caption == second.caption
    assert all(
        torch.equal(a.full(), b.full()) for a, b in zip(first.masks, second.masks, strict=True)
    )
    # Keypoints run only when a person was detected (random weights: maybe none).
    assert first.passes.pop("keypoints") in (0, 3)
    assert first.passes == {"detection": 1, "segmentation": 1, "caption": 4}


def test_only_kept_detections_are_decoded(micro_model):
    pipeline = Pipeline(micro_model, TorchRunner(micro_model.network))
    image = Image.effect_noise((96, 96), 60).convert("RGB")
    result = pipeline([Request(image, ("segmentation",), {}, 0.0, 2)])[0]
    assert result.tasks == ("detection", "segmentation")
    assert len(result.detections) == 2 and len(result.masks) == 2
    assert result.keypoints is None and result.caption is None
    assert result.masks[0].full().shape == (96, 96)


def test_autoregressive_cache_gives_the_same_tokens(micro_model):
    network = micro_model.network.eval()
    memory = network.encode(torch.rand(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool))
    codec = micro_model.codecs["detection"]
    index = torch.tensor([1, 0])
    cached = autoregressive_decode(network, memory, codec, codec.prompts(2), index, True)
    uncached = autoregressive_decode(network, memory, codec, codec.prompts(2), index, False)
    assert cached.shape == (2, codec.body_len) and torch.equal(cached, uncached)


def test_checkpoint_round_trip(micro_model, tmp_path):
    save_checkpoint(micro_model, tmp_path / "ckpt", step=7)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["step"] == 7 and meta["class_names"] == micro_model.config.class_names
    for key, value in micro_model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key]), key
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tokenizer"]


def test_tiny_model_overfits_two_images(tmp_path):
    torch.manual_seed(0)
    # World v1: the two images this test's steps and thresholds were sized on.
    write_synthetic_dataset(tmp_path, train=2, val=0, seed=3, world="v1")
    config = micro_config(d_model=64, image_size=(128, 128), num_bins=128, num_slots=10)
    dataset = CocoMultiTaskDataset(tmp_path, "train2017", build_transforms(False, 128))
    captions = [c for i in dataset.ids for c in dataset.captions(i)]
    from model.tokenizer import CaptionTokenizer

    mad = MAD.build(config, CaptionTokenizer.train(captions, 64))
    images, pads, targets = CanvasCollate(config.image_size)([dataset[0], dataset[1]])
    optimizer = torch.optim.AdamW(mad.network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    mad.network.train()
    losses = []
    for _ in range(320):
        seqs = {n: c.training_sequences(targets, generator) for n, c in mad.codecs.items()}
        loss = weighted_total(
            masked_training_losses(mad.network, images, pads, seqs, mad.codecs).terms,
            config.task_weights,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.1 * losses[0]
    # Decoded boxes match the annotations.
    coco = COCO(str(tmp_path / "annotations" / "instances_train2017.json"))
    pipeline = Pipeline(mad, TorchRunner(mad.network))
    for image_id in dataset.ids:
        info = coco.imgs[image_id]
        image = Image.open(tmp_path / "train2017" / info["file_name"]).convert("RGB")
        [result] = pipeline([Request(image, ("detection",), {}, 0.5, None)])
        anns = coco.imgToAnns[image_id]
        gt = torch.tensor(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ]
        )
        gt_labels = torch.tensor([a["category_id"] - 1 for a in anns])
        assert len(result.detections) == len(anns)
        iou = box_iou(gt, result.detections.boxes)
        best = iou.argmax(1)
        assert (iou.max(1).values > 0.7).all()
        assert torch.equal(result.detections.labels[best], gt_labels)


def test_folded_cross_attention_equals_per_sequence_memory(micro_model):
    """Sequences folded per image (uneven counts, unsorted) give the same logits and
    gradients as each sequence reading its own copy of its image."""
    network = micro_model.network.eval()
    torch.manual_seed(0)
    images = torch.rand(3, 3, *micro_model.config.image_size)
    memory = network.encode(images)
    image_index = torch.tensor([2, 0, 2, 2, 1, 0])
    codec = micro_model.codecs["detection"]
    tokens = torch.randint(codec.vocab_slice()[0], codec.vocab_slice()[1], (6, codec.seq_len))
    folded = network.decode(memory, tokens, image_index, codec.vocab_slice(), all_layers=True)
    copied = network.decode(
        memory, tokens, image_index, codec.vocab_slice(), all_layers=True, fold=False
    )
    assert torch.allclose(folded, copied, atol=1e-5)
    grads = []
    for fold in (True, False):
        network.zero_grad()
        memory = network.encode(images)
        network.decode(memory, tokens, image_index, codec.vocab_slice(), fold=fold).sum().backward()
        grads.append(network.input_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    network.zero_grad(set_to_none=True)
