"""What a training run starts from: its settings, its process group, its model (resumed,
initialised from weights, or fresh) and its optimizer. The loop itself: model/train.py."""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from model.checkpoint import CONFIG, MAD, load_checkpoint, read_checkpoint_config
from model.config import PRESETS, ModelConfig, get_preset
from model.data.coco import CocoMultiTaskDataset
from model.runner import torch_device
from model.startup import StartupError
from model.tokenizer import CaptionTokenizer
from model.train_state import META, TENSORS, has_train_state, train_state_step
from model.transfer import carry_weights, unknown_word_share

AMP_MODES = ("bf16", "fp16", "none")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    preset: str = "tiny"
    split: str = "train2017"
    val_split: str = "val2017"
    steps: int = 1000  # length of the lr schedule
    stop_at: int | None = None  # stop (and save) early without changing the schedule
    max_minutes: float | None = None  # also stop (and save) after this much wall time
    # With max_minutes: the lr schedule runs on whichever is further along, steps or wall
    # time, so that the cosine has ended when the time is up (a budgeted run, e.g. on a lent GPU).
    anneal_by_deadline: bool = False
    batch_size: int = 16  # per process and micro-batch
    accumulate: int = 1  # micro-batches per optimizer step (gradients added up)
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_scale: float = 0.05
    grad_clip: float = 0.1
    workers: int = 2
    device: str = "auto"
    amp: str = "bf16"  # AMP_MODES; fp16 runs on CUDA only
    seed: int = 0
    tokenizer: Path | None = None
    text_vocab_size: int | None = None  # trained tokenizer's size; None: the model config's
    tokenizer_type: str = "word"  # word | unigram | bpe (SentencePiece model types)
    resume: Path | None = None
    init: Path | None = None  # start from these weights with a fresh optimizer
    save_every: int = 500
    eval_every: int = 0  # 0: evaluate only at the end (when a val split exists)
    eval_images: int = 200
    log_every: int = 10
    profile_steps: tuple[int, int] | None = None  # (A, B): torch.profiler over steps A+1..B
    overrides: dict | None = None  # ModelConfig field overrides


# What a step's update follows from besides the batches: a resumed run keeps them as saved.
SCHEDULE_FIELDS = (
    "steps",
    "lr",
    "backbone_lr_scale",
    "weight_decay",
    "warmup_steps",
    "min_lr_scale",
    "grad_clip",
    "seed",
    "amp",
    "anneal_by_deadline",
)


def saved_schedule(directory: Path) -> dict[str, Any]:
    """The SCHEDULE_FIELDS a checkpoint's run was trained with ({} when it does not say, or
    there is no checkpoint: build_model refuses that)."""
    if not (directory / CONFIG).is_file():
        return {}
    training = read_checkpoint_config(directory).get("training") or {}
    return {k: training[k] for k in SCHEDULE_FIELDS if k in training}


DDP_TIMEOUT = datetime.timedelta(hours=2)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """-> (rank, world size, device); initialises the process group under torchrun."""
    device = str(torch_device(device))  # "auto" resolved; no GPU or a typo: a StartupError
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")  # under torchrun each rank takes its LOCAL_RANK's GPU
    # Rank 0 alone evaluates while the others wait in a collective: allow for a long one.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=DDP_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def build_optimizer(network: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the backbone learns at lr * backbone_lr_scale; no decay on norms and biases."""
    # (backbone, decayed) -> parameters
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (b, d): [] for b in (True, False) for d in (True, False)
    }
    for name, param in network.named_parameters():
        if param.requires_grad:
            groups[(name.startswith("backbone."), param.ndim > 1)].append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": cfg.lr * (cfg.backbone_lr_scale if backbone else 1.0),
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (backbone, decay), params in groups.items()
            if params
        ]
    )


def tokenizer_for(
    dataset: CocoMultiTaskDataset, cfg: TrainConfig, config: ModelConfig, rank: int
) -> CaptionTokenizer:
    """The given tokenizer, or one trained on the training captions (rank 0 trains it) with
    `cfg.text_vocab_size` pieces, else the model config's (the preset's, or --set's)."""
    if cfg.tokenizer:
        return CaptionTokenizer.load(cfg.tokenizer)
    path = cfg.out / "tokenizer.model"
    # Trained anew even where one lies (an interrupted first run's, of other data, say);
    # the other ranks read what rank 0 wrote.
    if rank == 0:
        captions = [c for image_id in dataset.ids for c in dataset.captions(image_id)]
        size = cfg.text_vocab_size or config.text_vocab_size
        CaptionTokenizer.train(captions, size, cfg.tokenizer_type).save(path)
    if dist.is_initialized():
        dist.barrier()
    return CaptionTokenizer.load(path)


def build_model(dataset: CocoMultiTaskDataset, cfg: TrainConfig, rank: int) -> tuple[MAD, int]:
    """-> (model, first step): resumed, initialised from weights, or fresh."""
    if cfg.resume:
        ignored = [
            flag
            for flag, value in (
                ("--set", cfg.overrides),
                ("--init", cfg.init),
                ("--tokenizer", cfg.tokenizer),
            )
            if value
        ]
        if ignored:
            raise StartupError(
                f"--resume continues a run as it was saved: {', '.join(ignored)} would be "
                f"ignored; to change the model, start from its weights with --init {cfg.resume}"
            )
        if not (cfg.resume / CONFIG).is_file():
            raise StartupError(f"--resume {cfg.resume}: no checkpoint there ({CONFIG} missing)")
        saved = saved_schedule(cfg.resume)
        # --steps may move the schedule's end (a longer run, a deadline-paced one going on);
        # the rest would change what each step does.
        if "steps" in saved and cfg.steps != saved["steps"] and rank == 0:
            tqdm.write(
                f"--resume {cfg.resume}: the lr schedule now ends at step {cfg.steps} "
                f"(saved: {saved['steps']})"
            )
        changed = [
            # min_lr_scale has no option: it is set in Python only
            f"{k if k == 'min_lr_scale' else '--' + k.replace('_', '-')} {getattr(cfg, k)} "
            f"(saved: {v})"
            for k, v in saved.items()
            if k != "steps" and getattr(cfg, k) != v
        ]
        if changed:
            raise StartupError(
                f"--resume continues a run exactly, as it was saved: {', '.join(changed)} "
                f"would change its schedule; leave them out, or start from its weights with "
                f"--init {cfg.resume} and a new schedule"
            )
        if not has_train_state(cfg.resume):
            raise StartupError(
                f"--resume {cfg.resume}: no training state ({TENSORS}, {META}) beside the "
                "weights, so the run cannot continue exactly (a converted or copied "
                f"checkpoint?); start from its weights with --init {cfg.resume}"
            )
        mad, meta = load_checkpoint(cfg.resume)
        state_step = train_state_step(cfg.resume)
        if state_step != meta.get("step", 0):
            raise StartupError(
                f"--resume {cfg.resume}: its training state is from step {state_step} and "
                f"its weights from step {meta.get('step', 0)} (a save was interrupted); "
                f"continue from the weights alone with --init {cfg.resume}"
            )
        if meta.get("step", 0) >= cfg.steps:
            raise StartupError(
                f"--resume {cfg.resume}: the run is finished (step {meta.get('step', 0)} of "
                f"{cfg.steps}); to train on, give a larger --steps (the schedule is then "
                f"stretched), or start from its weights with --init {cfg.resume}"
            )
        return mad, meta.get("step", 0)
    if cfg.init:
        return _initialised(cfg, dataset, rank), 0
    overrides = dict(cfg.overrides or {})
    overrides.setdefault("class_names", dataset.class_names)
    if dataset.keypoint_names:
        overrides.setdefault("keypoint_names", dataset.keypoint_names)
        overrides.setdefault("skeleton", [(a - 1, b - 1) for a, b in dataset.skeleton])
    try:
        config = get_preset(cfg.preset, **overrides)
    except (ValueError, TypeError) as exc:  # TypeError: an unknown config field
        raise StartupError(f"--set {cfg.overrides}: {exc}") from exc
    # A task whose annotations the data lacks would train on nothing yet still answer.
    missing = {
        "caption": not any(dataset.captions(i) for i in dataset.ids),
        "keypoints": not dataset.has_keypoints,
    }
    for task in [t for t in config.tasks if missing.get(t)]:
        config.tasks = [t for t in config.tasks if t != task]
        if rank == 0:
            tqdm.write(f"--data {cfg.data} has no {task} annotations: training without {task}")
    tokenizer = tokenizer_for(dataset, cfg, config, rank) if "caption" in config.tasks else None
    try:
        return MAD.build(config, tokenizer), 0
    except ValueError as exc:  # e.g. a backbone that cannot give what the config asks
        raise StartupError(f"--set {cfg.overrides}: {exc}") from exc


def _initialised(cfg: TrainConfig, dataset: CocoMultiTaskDataset, rank: int) -> MAD:
    """The --init checkpoint's model, changed where asked: --set overrides (new parameters
    start fresh) and, when the training captions have words its tokenizer does not know (or
    --tokenizer is given), a new tokenizer whose shared pieces keep their embeddings."""
    assert cfg.init is not None
    mad, _ = load_checkpoint(cfg.init)
    tokenizer = mad.tokenizer
    if "caption" in mad.config.tasks:
        captions = [c for image_id in dataset.ids for c in dataset.captions(image_id)]
        unknown = unknown_word_share(mad, captions)
        if cfg.tokenizer or unknown > 0:
            if unknown > 0:
                tqdm.write(
                    f"--init {cfg.init}: {unknown:.1%} of the training captions have words "
                    "its tokenizer does not know; training a new one"
                )
            preset = PRESETS[mad.config.name]() if mad.config.name in PRESETS else mad.config
            size = max(mad.config.text_vocab_size, preset.text_vocab_size)
            tokenizer = tokenizer_for(
                dataset, cfg, dataclasses.replace(mad.config, text_vocab_size=size), rank
            )
    if not cfg.overrides and tokenizer is mad.tokenizer:
        return mad
    try:
        changed = MAD.build(dataclasses.replace(mad.config, **(cfg.overrides or {})), tokenizer)
        fresh = carry_weights(mad, changed)
    except (ValueError, TypeError) as exc:  # TypeError: an unknown config field
        raise StartupError(f"--init {cfg.init} with --set {cfg.overrides}: {exc}") from exc
    if fresh:
        tqdm.write(f"--init {cfg.init}: these start fresh: {', '.join(fresh)}")
    return changed
