"""TensorRT engine planning that needs no GPU: the engine cache key and the optimisation
profile shapes (the engines themselves are built and run in tests/test_export_gpu.py)."""

from __future__ import annotations

from export.tensorrt import Profile, decoder_shapes, encoder_shapes
from model.decoding import VERIFY_GROUPS
from runtime.tensorrt_runner import engine_key

MODEL = {"image_size": [800, 1333], "num_slots": 100}
MEMORY = {"layers": 6, "heads": 8, "head_dim": 32}


def test_engine_key_names_gpu_tensorrt_and_checkpoint():
    key = engine_key("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0", "ab" * 32)
    assert key == "nvidia-h100-80gb-hbm3-sm90-trt10.13.0-abababababab"
    assert key != engine_key("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0", "cd" * 32)
    assert key != engine_key("NVIDIA A100-SXM4-80GB", (8, 0), "10.13.0", "ab" * 32)
    assert key != engine_key("NVIDIA H100 80GB HBM3", (9, 0), "10.14.1", "ab" * 32)


def test_profile_defaults_follow_the_model():
    profile = Profile().resolved(MODEL)
    assert (profile.max_batch, profile.opt_batch) == (8, 1)
    assert (profile.max_sequences, profile.opt_sequences) == (800, 100)
    assert profile.min_image == (400, 400)
    small = Profile(max_batch=2, opt_batch=4, max_sequences=16).resolved(MODEL)
    assert small.opt_batch == 2 and small.opt_sequences == 16  # opt never above max
    # A model whose caption candidates read back more rows per image than it has slots.
    tiny = {"image_size": [256, 256], "num_slots": 10, "caption_candidates": 8}
    assert Profile(max_batch=4).resolved(tiny).max_sequences == 4 * 8 * VERIFY_GROUPS
    # A model that also detects on mirror images encodes two images per request.
    flipping = {**tiny, "detection_flip": True}
    assert Profile(max_batch=4).resolved(flipping).max_batch == 8
    masks_flipping = {**tiny, "segmentation_flip": True}  # masks alone read them too
    assert Profile(max_batch=4).resolved(masks_flipping).max_batch == 8
    assert Profile(max_batch=4).resolved(tiny).max_batch == 4


def test_encoder_shapes_cover_one_small_image_to_a_full_batch():
    shapes = encoder_shapes(Profile().resolved(MODEL), MODEL)
    assert shapes["images"] == [(1, 3, 400, 400), (1, 3, 800, 1333), (8, 3, 1333, 1333)]
    assert shapes["pad_mask"] == [(1, 400, 400), (1, 800, 1333), (8, 1333, 1333)]
    low, _, high = shapes["images"]
    for canvas in ((800, 1333), (1333, 800)):  # landscape and portrait images
        for batch in (1, 8):
            shape = (batch, 3, *canvas)
            assert all(a <= b <= c for a, b, c in zip(low, shape, high, strict=True)), shape


def test_decoder_shapes_follow_the_encoder_features():
    profile = Profile().resolved(MODEL)
    shapes = decoder_shapes(profile, MEMORY, [260, 1050, 1050], seq_len=506)
    assert shapes["keys"] == [(6, 1, 8, 260, 32), (6, 1, 8, 1050, 32), (6, 8, 8, 1050, 32)]
    assert shapes["keys"] == shapes["values"]
    assert shapes["mask"] == [(1, 1, 1, 260), (1, 1, 1, 1050), (8, 1, 1, 1050)]
    assert shapes["tokens"] == [(1, 1), (100, 506), (800, 506)]
    assert shapes["image_index"] == [(1,), (100,), (800,)]
