"""The training loop: single process (CPU or one GPU) or DDP under torchrun.

Each step encodes every image of the batch once and decodes all of its tasks (fully and
partly masked sequences) against that encoding, as the paper does; with --accumulate N a step
does so for N micro-batches and adds up their gradients before the update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

from model.checkpoint import MAD, WEIGHTS, save_checkpoint
from model.config import flip_pairs_from_names
from model.data.batching import (
    CanvasCollate,
    SeededDataset,
    StepBatchSampler,
    TrainingCollate,
    transposed_images,
)
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import training_transforms
from model.losses import TaskLosses, masked_training_losses, weighted_total
from model.lr_schedule import DeadlinePace, resumed_scheduler
from model.network import MADNetwork
from model.startup import StartupError, output_dir
from model.train_log import CsvLog
from model.train_profile import StepProfiler
from model.train_start import (
    TrainConfig,
    build_model,
    build_optimizer,
    setup_distributed,
)
from model.train_state import (
    load_train_state,
    train_state_files,
)


def train(cfg: TrainConfig) -> Path:
    """Train; -> the final checkpoint directory (cfg.out)."""
    rank, world, device = setup_distributed(cfg.device)
    if cfg.accumulate < 1:
        raise StartupError(f"--accumulate {cfg.accumulate}: a step needs a micro-batch (>= 1)")
    if cfg.stop_at is not None and cfg.stop_at > cfg.steps:
        raise StartupError(
            f"--stop-at {cfg.stop_at} is past the schedule's end (--steps {cfg.steps}): the run "
            "would end there anyway"
        )
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
    # One sampler batch per micro-batch: step s's are micro-batches s*A .. s*A + A-1.
    micro = cfg.accumulate
    sampler = StepBatchSampler(
        len(dataset),
        cfg.batch_size,
        cfg.seed,
        start_step * micro,
        last_step * micro,
        rank,
        world,
        transposed,
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
    network = synchronised_batchnorm(network, world, device)
    model = DistributedDataParallel(network) if world > 1 else network
    optimizer = build_optimizer(network, cfg)
    # fp16 needs loss scaling (small gradients underflow); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")  # fp16 is CUDA only
    paced = 0.0
    if cfg.resume:
        state = load_train_state(cfg.resume, optimizer)  # its step: checked in build_model
        if rank == 0 and (changed := batch_changes(state, cfg, world)):
            tqdm.write(
                f"--resume {cfg.resume}: {', '.join(changed)}: training goes on from step "
                f"{start_step}, but not exactly as the saved run would have (other batches)"
            )
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
    saved_at = start_step if (cfg.out / WEIGHTS).exists() else 0  # the checkpoint in cfg.out

    def accumulated_step(step: int) -> TaskLosses:
        """Forward and backward of the step's micro-batches, their gradients added up
        (each loss / micro: the mean over the micro-batches; under DDP all-reduced once, with
        the last) -> the losses to log, totals over every micro-batch's tokens.
        StopIteration when the loader has run out."""
        nonlocal waited
        totals: list[torch.Tensor] = []
        for m in range(micro):
            asked = time.perf_counter()
            with profiler.phase("data"):
                batch = next(batches)
            waited += time.perf_counter() - asked
            n = step * micro + m  # the micro-batch's index: dropout is exact on resume
            torch.manual_seed(cfg.seed + n * world + rank)
            last = m == micro - 1
            sync = (
                model.no_sync()
                if isinstance(model, DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with sync:
                with amp, profiler.phase("forward"):
                    batch = batch.to(device)
                    losses = masked_training_losses(
                        model, batch.images, batch.pads, batch.sequences, mad.codecs
                    )
                loss = weighted_total(losses.terms, config.task_weights) / micro
                with profiler.phase("backward"):
                    scaler.scale(loss).backward()
            totals.append(losses.totals)
        return TaskLosses(losses.terms, torch.stack(totals).sum(0))

    try:
        while True:
            optimizer.zero_grad(set_to_none=True)
            try:
                losses = accumulated_step(step)
            except StopIteration:
                break
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
                    rate = (step - logged) * cfg.batch_size * micro * world / (now - tic)
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
                                "lr": scheduled_lr(cfg.lr, scheduler),
                                "grad_norm": grad_value,
                                "images_per_s": rate,
                                "data_wait": data_wait,
                                **by_task,
                            }
                        )
                paused = time.perf_counter()
                if step % cfg.save_every == 0 or step == last_step or out_of_time:
                    _save(mad, cfg, step, optimizer, scaler, pace, world)
                    saved_at = step
                if cfg.eval_every and step % cfg.eval_every == 0 and step != last_step:
                    _evaluate(mad, cfg, device, log, step)
                    network.train()
                tic += time.perf_counter() - paused  # saving and evaluating are not training
            profiler.stepped(step)
            if out_of_time:
                break
    except KeyboardInterrupt:  # Ctrl-C: say what is kept (a save is atomic), then stop
        if rank == 0:
            bar.close()
            tqdm.write(
                f"interrupted after step {step}: {cfg.out} holds step {saved_at}; continue "
                f"with --resume {cfg.out}"
                if saved_at
                else f"interrupted after step {step}, before the first save (every "
                f"{cfg.save_every} steps): "
                + (f"--resume {cfg.resume} again" if cfg.resume else "nothing to resume")
            )
        raise
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


def synchronised_batchnorm(network: MADNetwork, world: int, device: torch.device) -> MADNetwork:
    """Under DDP on GPUs, batch norms that train (the `tiny` preset's; frozen ones are not
    batch norms to torch) compute their statistics over every rank's images (SyncBatchNorm),
    as one process would over the whole batch: a rank's share alone is a few images. The
    state dict keeps its names, so checkpoints load into plain batch norms. Left as is in one
    process, and on CPU, where torch has no SyncBatchNorm. timm's converter does what torch's
    does and also keeps the activation of timm's fused batch-norm layers (timm backbones)."""
    if world < 2 or device.type != "cuda":
        return network
    from timm.layers import convert_sync_batchnorm

    return cast(MADNetwork, convert_sync_batchnorm(network))


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


def scheduled_lr(lr: float, scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """--lr as the schedule has it now (the backbone's is that times its scale): every
    parameter group follows the one factor."""
    base = float(max(scheduler.base_lrs))
    now = float(scheduler.get_last_lr()[scheduler.base_lrs.index(base)])
    return lr * now / base if base else 0.0


def batch_changes(state: dict, cfg: TrainConfig, world: int) -> list[str]:
    """What makes a step's batch differ from the saved run's (its images and their order
    follow from batch size, micro-batches and processes) -> e.g. ["--batch-size 16 -> 8"]; a
    state saved before these were recorded shows only --accumulate (then always 1)."""
    now = {"--batch-size": cfg.batch_size, "--accumulate": cfg.accumulate, "processes": world}
    saved = {
        "--batch-size": state.get("batch_size"),
        "--accumulate": state.get("accumulate", 1),
        "processes": state.get("world"),
    }
    return [f"{k} {saved[k]} -> {v}" for k, v in now.items() if saved[k] not in (None, v)]


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
    world: int,
) -> None:
    """The checkpoint and, beside it, what --resume needs to continue exactly."""
    state = {
        "grad_scaler": scaler.state_dict(),
        "cosine_progress": pace.progress(),
        "batch_size": cfg.batch_size,
        "accumulate": cfg.accumulate,
        "world": world,
    }
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
