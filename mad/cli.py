"""`mad`: one command for data, training, evaluation, export, serving and benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from export.cli import export
from mad.bench.cli import bench
from mad.checkpoint_cli import checkpoint_app
from mad.data_cli import data_app
from mad.help import PlainHelpCommand, new_app, one_line_errors
from model.config import parse_overrides as config_overrides
from model.request_spec import (
    MAX_REFINE_STEPS,
    RequestError,
    check_nms_iou,
    parse_refine_steps,
    parse_tasks,
)
from model.startup import DEVICES, StartupError, output_file
from service.cli import predict, request_error, serve
from service.setting_options import device_option

if TYPE_CHECKING:
    from model.checkpoint import MAD

app = new_app(help="MAD Serve: the Masked AutoDecoder vision generalist.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(checkpoint_app, name="checkpoint")


@app.callback()
def main(
    debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks for start-up errors too [env MAD_DEBUG]."
    ),
) -> None:
    """MAD Serve: the Masked AutoDecoder vision generalist."""
    if debug:
        os.environ["MAD_DEBUG"] = "1"  # worker processes inherit it


app.command(cls=PlainHelpCommand)(one_line_errors(serve))
app.command(cls=PlainHelpCommand)(one_line_errors(predict))
app.command(cls=PlainHelpCommand)(one_line_errors(export))
app.command(cls=PlainHelpCommand)(one_line_errors(bench))


def parse_overrides(values: list[str]) -> dict[str, Any]:
    """--set values -> config overrides (model.config.parse_overrides), as a usage error."""
    try:
        return config_overrides(values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None


@app.command(cls=PlainHelpCommand)
@one_line_errors
def train(
    data: Path = typer.Option(..., help="Dataset root in the COCO 2017 layout."),
    out: Path = typer.Option(..., help="Checkpoint directory to write."),
    preset: str = typer.Option("tiny", help="Model preset: tiny, r50, swin-b, vit-b."),
    steps: int | None = typer.Option(
        None, min=1, help="Length of the lr schedule [default: 1000; --resume: the run's]."
    ),
    stop_at: int | None = typer.Option(
        None, min=1, help="Stop (and save) at this step; resume later."
    ),
    log_every: int = typer.Option(10, min=1, help="Steps between train_log.csv rows."),
    profile_steps: str | None = typer.Option(
        None,
        metavar="A:B",
        help="Profile steps A+1..B with torch.profiler (host and device time per phase and "
        "operator): OUT/profile/steps.txt and trace.json.",
    ),
    max_minutes: float | None = typer.Option(
        None, min=0.1, help="Also stop (and save) after this many minutes; resume later."
    ),
    anneal_by_deadline: bool | None = typer.Option(
        None,
        "--anneal-by-deadline/--no-anneal-by-deadline",
        help="With --max-minutes: run the lr schedule on steps or wall time, whichever is "
        "further along, so that it has annealed when the time is up [default: off; --resume: "
        "the run's].",
        show_default=False,
    ),
    batch_size: int = typer.Option(16, min=1, help="Images per process and micro-batch."),
    accumulate: int = typer.Option(
        1,
        min=1,
        help="Micro-batches per optimizer step, their gradients added up: a step sees "
        "batch-size x accumulate images per process.",
    ),
    lr: float | None = typer.Option(None, help="Peak lr [default: 1e-4; --resume: the run's]."),
    backbone_lr_scale: float | None = typer.Option(
        None, help="Backbone lr = lr * this [default: 0.1; --resume: the run's]."
    ),
    weight_decay: float | None = typer.Option(None, help="[default: 1e-4; --resume: the run's]"),
    warmup_steps: int | None = typer.Option(
        None, min=0, help="[default: 100; --resume: the run's]"
    ),
    grad_clip: float | None = typer.Option(None, help="[default: 0.1; --resume: the run's]"),
    workers: int = typer.Option(2, min=0, help="Data loader processes."),
    device: str = typer.Option(
        "auto",
        callback=device_option,
        help="auto, cpu, cuda or cuda:N (under torchrun each rank takes its own GPU).",
    ),
    amp: str | None = typer.Option(
        None,
        help="Mixed precision: bf16 (CPU and CUDA), fp16 (CUDA, loss-scaled) or none "
        "[default: bf16; --resume: the run's].",
    ),
    seed: int | None = typer.Option(None, help="[default: 0; --resume: the run's]"),
    split: str = typer.Option("train2017"),
    val_split: str = typer.Option("val2017"),
    tokenizer: Path | None = typer.Option(None, help="SentencePiece .model; else trained."),
    text_vocab_size: int | None = typer.Option(
        None,
        min=8,
        help="Pieces of the trained tokenizer (default: the preset's, "
        "11421 for r50/swin-b/vit-b as the reference, 256 for tiny; or --set's).",
    ),
    tokenizer_type: str = typer.Option("word", help="Trained tokenizer: word, unigram, bpe."),
    resume: Path | None = typer.Option(None, help="Checkpoint to resume exactly."),
    init: Path | None = typer.Option(None, help="Checkpoint to start from (new optimizer)."),
    save_every: int = typer.Option(500, min=1),
    eval_every: int = typer.Option(0, min=0, help="0: evaluate only at the end."),
    eval_images: int = typer.Option(200, min=1),
    set_: list[str] = typer.Option([], "--set", help="Model config override KEY=VALUE."),
) -> None:
    """Train a MAD model (single process, or DDP under torchrun)."""
    from model.config import PRESETS
    from model.tokenizer import MODEL_TYPES
    from model.train import train as run_training
    from model.train_profile import parse_window
    from model.train_start import AMP_MODES, TrainConfig, saved_schedule

    if preset not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(PRESETS)}", param_hint="--preset")
    if amp is not None and amp not in AMP_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(AMP_MODES)}", param_hint="--amp")
    if lr is not None and lr <= 0:
        raise typer.BadParameter(f"{lr} is not a learning rate (> 0)", param_hint="--lr")
    try:
        window = parse_window(profile_steps) if profile_steps is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile-steps") from None
    require_split(data, split)
    if tokenizer_type not in MODEL_TYPES:
        raise typer.BadParameter(
            f"choose one of {', '.join(MODEL_TYPES)}", param_hint="--tokenizer-type"
        )

    # Schedule options left out: the resumed run's, else TrainConfig's defaults. One given
    # that differs from the resumed run's is refused (model.train_start.build_model).
    given = dict(
        steps=steps,
        lr=lr,
        backbone_lr_scale=backbone_lr_scale,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        seed=seed,
        amp=amp,
        anneal_by_deadline=anneal_by_deadline,
    )
    saved = saved_schedule(resume) if resume is not None else {}
    schedule = {k: v for k, v in saved.items() if given.get(k) is None}
    schedule |= {k: v for k, v in given.items() if v is not None}
    if schedule.get("anneal_by_deadline") and max_minutes is None:
        where = "" if anneal_by_deadline else " (the resumed run was paced to a deadline)"
        raise typer.BadParameter(f"needs --max-minutes{where}", param_hint="--anneal-by-deadline")
    run_training(
        TrainConfig(
            data=data,
            out=out,
            preset=preset,
            split=split,
            val_split=val_split,
            stop_at=stop_at,
            max_minutes=max_minutes,
            log_every=log_every,
            profile_steps=window,
            batch_size=batch_size,
            accumulate=accumulate,
            workers=workers,
            device=device,
            tokenizer=tokenizer,
            text_vocab_size=text_vocab_size,
            tokenizer_type=tokenizer_type,
            resume=resume,
            init=init,
            save_every=save_every,
            eval_every=eval_every,
            eval_images=eval_images,
            overrides=parse_overrides(set_),
            **schedule,
        )
    )


@app.command("eval", cls=PlainHelpCommand)
@one_line_errors
def evaluate_command(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory."),
    data: Path = typer.Option(..., help="Dataset root in the COCO 2017 layout."),
    split: str = typer.Option("val2017"),
    refine_steps: list[str] = typer.Option(
        [],
        "--refine-steps",
        "--refine",
        help="Refinement steps: K for all, or task:K (comma-separated or repeated).",
    ),
    tasks: list[str] = typer.Option(
        [],
        "--tasks",
        "--task",
        help="Evaluate only these tasks (comma-separated or repeated; default all).",
    ),
    limit: int | None = typer.Option(None, min=1, help="Evaluate the first N images only."),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("cpu", callback=device_option, help=DEVICES),
    nms_iou: float | None = typer.Option(
        None, help="Class-wise NMS IoU, 0..1 (1: off; default: the checkpoint's)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the metrics here."),
    decoding: list[str] = typer.Option(
        [],
        "--decoding",
        help="Decoding option KEY=VALUE instead of the checkpoint's (repeatable; those `mad "
        "tune --decoding` chooses, e.g. caption_candidates=1): the same weights read another "
        "way.",
    ),
) -> None:
    """Each task's metrics: COCO AP (bbox, segm, keypoints via pycocotools), caption BLEU-4
    (sacrebleu), or whatever another task's codec reports."""
    from model.checkpoint import load_checkpoint
    from model.evaluate import evaluate, format_table, unscored_tasks
    from model.runner import torch_device

    require_checkpoint(checkpoint)
    device = str(torch_device(device))
    if json_out is not None:
        output_file(json_out, "--json")  # before the evaluation, not after it
    mad, _ = load_checkpoint(checkpoint, device)
    set_decoding(mad, decoding)
    try:
        task_names = parse_tasks(tasks, mad.config.tasks)
        runs = mad.tasks_to_run(task_names)
        steps = parse_refine_steps(refine_steps, mad.config.tasks, runs)
        nms_iou = check_nms_iou(nms_iou)
    except RequestError as exc:
        request_error("eval", exc)
    require_split(data, split)
    for name, why in unscored_tasks(mad, data, split, task_names).items():
        typer.echo(f"mad eval: {name} not scored: {why}", err=True)
    metrics = evaluate(
        mad, data, split, device, steps, limit, batch_size, tasks=task_names, nms_iou=nms_iou
    )
    typer.echo(format_table(metrics))
    if json_out:
        report = {
            "checkpoint": str(checkpoint),
            "data": str(data),
            "split": split,
            "refine_steps": mad.refine_steps(steps, runs),
            "nms_iou": mad.config.nms_iou if nms_iou is None else nms_iou,
            "decoding": {option: getattr(mad.config, option) for option in mad.decoding_options()},
            "metrics": metrics,
        }
        json_out.write_text(json.dumps(report, indent=2) + "\n")


def require_decoding_options(mad: MAD, names: list[str], hint: str) -> None:
    """A usage error (for option `hint`) unless every name is a decoding option of the model."""
    try:
        mad.check_decoding_options(names)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None


def set_decoding(mad: MAD, items: list[str]) -> None:
    """--decoding KEY=VALUE items -> set on mad.config (the codecs read it), or a usage error:
    a key that is no decoding option of the model's tasks, or a value the config refuses."""
    try:
        mad.set_decoding(config_overrides(items))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--decoding") from None


def require_checkpoint(checkpoint: Path) -> None:
    """Not a checkpoint directory: a StartupError (one line, exit 3), as in every command."""
    if not (checkpoint / "config.json").is_file():
        raise StartupError(
            f"--checkpoint: {checkpoint} is not a checkpoint directory (no config.json)"
        )


def require_split(data: Path, split: str) -> None:
    """No annotations for the split: a StartupError naming the file and what --data must be."""
    annotations = data / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        raise StartupError(
            f"--data: {annotations} not found; --data must be a dataset in the COCO 2017 "
            f"layout (e.g. written by `mad data synth`) with a {split} split"
        )


@app.command("tune", cls=PlainHelpCommand)
@one_line_errors
def tune_command(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory."),
    data: Path = typer.Option(
        ...,
        help="Held-out data in the COCO 2017 layout: not the images you will report results on.",
    ),
    split: str = typer.Option("val2017"),
    tasks: list[str] = typer.Option(
        [],
        "--tasks",
        "--task",
        help="Tune only these tasks (comma-separated or repeated; default all).",
    ),
    limit: int | None = typer.Option(200, min=1, help="Score on the first N images."),
    max_steps: int = typer.Option(
        4,
        min=0,
        max=MAX_REFINE_STEPS,
        help="Longest schedule tried (requests allow 0..8; not used with --decoding).",
    ),
    tolerance: float = typer.Option(
        0.003,
        min=0.0,
        help="Take the shortest schedule this close to the best (with --decoding: keep the "
        "reference's value this close to the best).",
    ),
    device: str = typer.Option("cpu", callback=device_option, help=DEVICES),
    decoding: bool = typer.Option(
        False,
        "--decoding",
        help="Choose the decoding options (coordinate window, box confidence, mirror image, "
        "zoomed crops, mask threshold and scores, caption candidates: docs/model.md) instead "
        "of the schedules: detection's and those of the tasks it prompts by their mean AP, a "
        "caption's by its metric.",
    ),
    options: list[str] = typer.Option(
        [],
        "--option",
        help="With --decoding: tune only this decoding option, the others held (repeatable).",
    ),
    write: bool = typer.Option(False, help="Store what was chosen in the checkpoint."),
) -> None:
    """Choose each task's default refinement schedule (or, with --decoding, how the model's
    logits are read) by its metric on held-out data."""
    from model.checkpoint import load_checkpoint, write_schedules
    from model.evaluate import unscored_tasks
    from model.runner import torch_device
    from model.tune import Trial, tune_schedules

    require_checkpoint(checkpoint)
    device = str(torch_device(device))
    mad, _ = load_checkpoint(checkpoint, device)
    try:
        task_names = parse_tasks(tasks, mad.config.tasks)
    except RequestError as exc:
        request_error("tune", exc)
    require_split(data, split)
    unscored = unscored_tasks(mad, data, split, task_names)
    if set(unscored) == set(task_names):
        reasons = "; ".join(f"{name}: {why}" for name, why in unscored.items())
        raise StartupError(f"--data has no ground truth for the tasks to tune ({reasons})")
    for name, why in unscored.items():
        typer.echo(f"mad tune: {name} not tuned: {why}", err=True)
    task_names = tuple(t for t in task_names if t not in unscored)
    if options and not decoding:
        raise typer.BadParameter("only with --decoding", param_hint="--option")
    require_decoding_options(mad, options, "--option")
    if decoding:
        tune_decoding_command(
            mad, checkpoint, data, split, task_names, limit, device, tolerance, write, options
        )
        return
    before = {t: list(r) for t, r in mad.config.schedules.items()}

    def report(name: str, trial: Trial) -> None:
        metric = mad.codecs[name].metric
        typer.echo(f"{name:<13} {trial.ratios!s:<34} {metric} {trial.score:.4f}")

    trials = tune_schedules(
        mad, data, split, task_names, limit, device, max_steps, tolerance, report
    )
    for name in trials:
        typer.echo(f"{name}: {before.get(name, [])} -> {mad.config.schedules[name]}")
    if write:
        write_schedules(
            checkpoint,
            mad.config.schedules,
            {
                name: {
                    "data": str(data),
                    "split": split,
                    "images": limit,
                    "tolerance": tolerance,
                    "metric": mad.codecs[name].metric,
                    "scores": [[t.ratios, round(t.score, 5)] for t in tried],
                }
                for name, tried in trials.items()
            },
        )
        typer.echo(f"wrote the schedules to {checkpoint}")


def tune_decoding_command(
    mad: MAD,
    checkpoint: Path,
    data: Path,
    split: str,
    tasks: tuple[str, ...],
    limit: int | None,
    device: str,
    tolerance: float,
    write: bool,
    options: list[str] | None = None,
) -> None:
    """`mad tune --decoding`: report each trial, then what was chosen; store it with --write."""
    from model.checkpoint import write_decoding
    from model.tune import DecodingTrial, tune_decoding

    def report(trial: DecodingTrial) -> None:
        typer.echo(f"{trial.option:<24} {trial.value!s:<6} {trial.metric} {trial.score:.4f}")

    before = dataclasses.asdict(mad.config)
    trials = tune_decoding(
        mad, data, split, tasks, limit, device, tolerance, report, only=options or None
    )
    if not trials:
        raise StartupError("--decoding: none of the tasks to tune has decoding options")
    chosen = {t.option: getattr(mad.config, t.option) for t in trials}
    for option, value in chosen.items():
        typer.echo(f"{option}: {before[option]} -> {value}")
    if write:
        metrics = {t.option: t.metric for t in trials}
        record = {
            option: {
                "data": str(data),
                "split": split,
                "images": limit,
                "tolerance": tolerance,
                "metric": metrics[option],
                # the values held at first, of the options scored by the same metric
                "start": {o: before[o] for o in chosen if metrics[o] == metrics[option]},
                "scores": [[t.value, round(t.score, 5)] for t in trials if t.option == option],
            }
            for option in chosen
        }
        write_decoding(checkpoint, chosen, record)
        typer.echo(f"wrote the decoding options to {checkpoint}")


if __name__ == "__main__":
    app()
