"""The training loop: single process (CPU or one GPU) or DDP under torchrun.

Each step encodes every image of the batch once and decodes all of its tasks (fully and
partly masked sequences) against that encoding, as the paper does.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from model.checkpoint import MAD, WEIGHTS, load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, get_preset
from model.data.batching import (
    CanvasCollate,
    SeededDataset,
    StepBatchSampler,
    TrainingCollate,
    transposed_images,
)
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import flip_pairs_from_names, training_transforms
from model.losses import TaskLosses, masked_training_losses, weighted_total
from model.lr_schedule import DeadlinePace, resumed_scheduler
from model.runner import torch_device
from model.startup import StartupError, output_dir
from model.tokenizer import CaptionTokenizer
from model.train_log import CsvLog
from model.train_profile import StepProfiler
from model.train_state import (
    META,
    TENSORS,
    has_train_state,
    load_train_state,
    train_state_files,
    train_state_step,
)
from model.transfer import carry_weights, unknown_word_share


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
    batch_size: int = 16  # per process
    lr: float = 1e-4
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_scale: float = 0.05
    grad_clip: float = 0.1
    workers: int = 2
    device: str = "auto"
    amp: str = "bf16"  # AMP_MODES; on CPU bf16 or none (fp16 falls back to fp32)
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
    if rank == 0 and not path.exists():
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
    if not any(dataset.captions(i) for i in dataset.ids):
        config.tasks = [t for t in config.tasks if t != "caption"]
    tokenizer = tokenizer_for(dataset, cfg, config, rank)
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


def train(cfg: TrainConfig) -> Path:
    """Train; -> the final checkpoint directory (cfg.out)."""
    rank, world, device = setup_distributed(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise StartupError(f"--amp fp16 runs on CUDA only; on {device.type} use bf16 or none")
    continued = cfg.resume is not None and cfg.resume.resolve() == cfg.out.resolve()
    if (cfg.out / WEIGHTS).exists() and not continued:
        raise StartupError(
            f"--out {cfg.out} already holds a trained model: continue it with --resume "
            f"{cfg.out}, or write to a new --out"
        )
    made = not cfg.out.exists()
    output_dir(cfg.out, "--out")
    torch.manual_seed(cfg.seed)
    try:
        dataset = CocoMultiTaskDataset(cfg.data, cfg.split)
        mad, start_step = build_model(dataset, cfg, rank)
    except StartupError:
        if made and rank == 0:  # a failed start leaves nothing behind (e.g. a lone tokenizer)
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise
    config = mad.config
    # The model's keypoint names decide the flips: known only now.
    dataset.transforms = training_transforms(config, flip_pairs_from_names(config.keypoint_names))
    last_step = min(cfg.steps, cfg.stop_at or cfg.steps)
    transposed = transposed_images(dataset.image_sizes(), config.image_size)
    sampler = StepBatchSampler(
        len(dataset), cfg.batch_size, cfg.seed, start_step, last_step, rank, world, transposed
    )
    loader = DataLoader(
        SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=TrainingCollate(CanvasCollate.for_config(config), mad.codecs),
        persistent_workers=cfg.workers > 0,
        pin_memory=device.type == "cuda",  # so that the copies to the GPU are asynchronous
    )
    network = mad.required_network().to(device).train()
    network.backbone.to(memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
    model = DistributedDataParallel(network) if world > 1 else network
    optimizer = build_optimizer(network, cfg)
    # fp16 needs loss scaling (small gradients underflow); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # fp16 is CUDA only
    paced = 0.0
    if cfg.resume:
        state = load_train_state(cfg.resume, optimizer)  # its step: checked in build_model
        scaler.load_state_dict(state.get("grad_scaler") or scaler.state_dict())
        paced = DeadlinePace.step_at(float(state.get("cosine_progress", 0.0)), cfg)
    pace = DeadlinePace(cfg, start_step, paced)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, pace.factor, last_epoch=start_step - 1)
        if start_step == 0
        else resumed_scheduler(optimizer, cfg, start_step, pace)
    )
    amp = _autocast(device, cfg.amp)
    log = CsvLog(cfg.out / "train_log.csv", up_to=start_step) if rank == 0 else None
    bar = tqdm(total=last_step, initial=start_step, disable=rank != 0, dynamic_ncols=True)
    step, tic, logged = start_step, time.perf_counter(), start_step
    started, budget_s = tic, cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    batches, waited = iter(loader), 0.0  # waited: seconds blocked on the loader since the last log
    profiler = StepProfiler(cfg.profile_steps if rank == 0 else None, cfg.out, device)
    profiler.stepped(step)
    try:
        while True:
            asked = time.perf_counter()
            try:
                with profiler.phase("data"):
                    batch = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - asked
            torch.manual_seed(cfg.seed + step * world + rank)  # dropout: exact on resume
            with amp, profiler.phase("forward"):
                batch = batch.to(device)
                losses = masked_training_losses(
                    model, batch.images, batch.pads, batch.sequences, mad.codecs
                )
            loss = weighted_total(losses.terms, config.task_weights)
            optimizer.zero_grad(set_to_none=True)
            with profiler.phase("backward"):
                scaler.scale(loss).backward()
            with profiler.phase("optimizer"):
                scaler.unscale_(optimizer)  # clip the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            spent = _time_spent(started, budget_s, world, device)
            out_of_time = spent >= 1
            step += 1
            pace.update(step, spent)
            scheduler.step()
            if rank == 0:
                bar.update(1)
                # Reading a value waits for the device: only on logged steps, so the host
                # prepares the next batch while a GPU still runs this one.
                if step % cfg.log_every == 0 or step == last_step or out_of_time:
                    loss_value, grad_value, by_task = _read_logged(
                        losses, grad_norm, config.task_weights
                    )
                    now = time.perf_counter()
                    rate = (step - logged) * cfg.batch_size * world / (now - tic)
                    # near 1: the loader, not the model, sets the pace
                    data_wait = waited / (now - tic)
                    tic, logged, waited = now, step, 0.0
                    shown = {k[:3]: f"{v:.3f}" for k, v in by_task.items()}
                    bar.set_postfix(
                        loss=f"{loss_value:.3f}",
                        **shown,
                        img_s=f"{rate:.1f}",
                        wait=f"{data_wait:.0%}",
                    )
                    if log is not None:
                        log.write(
                            {
                                "step": step,
                                "loss": loss_value,
                                "lr": scheduler.get_last_lr()[0],
                                "grad_norm": grad_value,
                                "images_per_s": rate,
                                "data_wait": data_wait,
                                **by_task,
                            }
                        )
                paused = time.perf_counter()
                if step % cfg.save_every == 0 or step == last_step or out_of_time:
                    _save(mad, cfg, step, optimizer, scaler, pace)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != last_step:
                    _evaluate(mad, cfg, device, log, step)
                    network.train()
                tic += time.perf_counter() - paused  # saving and evaluating are not training
            profiler.stepped(step)
            if out_of_time:
                break
    finally:  # a run stopped inside the window still reports what it profiled
        profiler.close(step)
    bar.close()
    for path in profiler.paths:
        tqdm.write(f"profile: {path}")
    if rank == 0:
        _evaluate(mad, cfg, device, log, step)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return cfg.out


def _read_logged(
    losses: TaskLosses, grad_norm: torch.Tensor, task_weights: dict[str, float]
) -> tuple[float, float, dict[str, float]]:
    """-> (weighted loss, gradient norm, each task's mean loss) read from the device in one
    transfer; the means are over every rank's tokens (under DDP the step's loss is this
    rank's share), a task without tokens on any rank left out."""
    means = losses.means()
    total = weighted_total({n: m.nan_to_num() for n, m in means.items()}, task_weights)
    values: list[float] = torch.stack([total, grad_norm.float(), *means.values()]).tolist()
    by_task = {n: v for n, v in zip(means, values[2:], strict=True) if not math.isnan(v)}
    return values[0], values[1], by_task


def _time_spent(started: float, budget_s: float, world: int, device: torch.device) -> float:
    """Share of the wall-time budget spent (0 without one); under DDP the largest of any
    rank's, so that all ranks stop together and pace the lr alike."""
    if budget_s == math.inf:
        return 0.0
    spent = (time.perf_counter() - started) / budget_s
    if world == 1:
        return spent
    share = torch.tensor([spent], device=device)
    dist.all_reduce(share, op=dist.ReduceOp.MAX)
    return float(share.item())


AMP_MODES = ("bf16", "fp16", "none")


def _autocast(device: torch.device, amp: str) -> torch.autocast:
    """Mixed precision: bf16 on CPU too (1.4x a step on CPUs with avx512_bf16/AMX; losses
    within 0.2% of fp32), fp16 only on CUDA (train() refuses it elsewhere)."""
    if amp == "none" or (device.type == "cpu" and amp != "bf16"):
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _save(
    mad: MAD,
    cfg: TrainConfig,
    step: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    pace: DeadlinePace,
) -> None:
    """The checkpoint and, beside it, what --resume needs to continue exactly."""
    state = {"grad_scaler": scaler.state_dict(), "cosine_progress": pace.progress()}
    save_checkpoint(
        mad,
        cfg.out,
        step=step,
        extra_files=train_state_files(optimizer, step, state),
        training={
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()
        },
    )


def _has_split(cfg: TrainConfig) -> bool:
    return (cfg.data / "annotations" / f"instances_{cfg.val_split}.json").is_file()


def _evaluate(
    mad: MAD, cfg: TrainConfig, device: torch.device, log: CsvLog | None, step: int
) -> None:
    val = CocoMultiTaskDataset(cfg.data, cfg.val_split) if _has_split(cfg) else None
    if val is None or not val.ids:  # no validation split, or an empty one (--val 0)
        return
    from model.evaluate import evaluate  # evaluation pulls in COCOeval only when needed

    metrics = evaluate(mad, cfg.data, cfg.val_split, device=str(device), limit=cfg.eval_images)
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if log is not None:
        log.write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
