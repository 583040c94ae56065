"""`mad data`: write synthetic datasets and contact sheets of a synthetic world, merge datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from mad.help import PlainHelpCommand, new_app, one_line_errors
from model.startup import StartupError, output_dir, output_file

data_app = new_app(help="Datasets.", no_args_is_help=True)


def check_world(world: str) -> None:
    """An unknown world is a usage error; v3 without its source images, a one-line error."""
    from model.data.synth import WORLDS, v3

    if world not in WORLDS:
        raise typer.BadParameter(f"expected one of {', '.join(WORLDS)}", param_hint="--world")
    if world == "v3":
        v3.check_sources()


@data_app.command("synth", cls=PlainHelpCommand)
@one_line_errors
def data_synth(
    out: Path = typer.Option(
        ...,
        help="Output directory (COCO 2017 layout): new, empty, or a dataset written here "
        "before (replaced whole).",
    ),
    train: int = typer.Option(3000, min=0, help="Training images."),
    val: int = typer.Option(500, min=0, help="Validation images."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
    workers: int = typer.Option(1, min=1, help="Processes (output does not depend on it)."),
    world: str = typer.Option(
        "v2",
        help="v2: randomised styles, poses, backgrounds and distractors; v3: v2 with 30% of "
        "its backgrounds cut from natural images; v1: the first world, reproduced exactly.",
    ),
) -> None:
    """Write a synthetic dataset of shapes and stick figures with boxes, masks, keypoints
    and captions."""
    from model.data.synth import main
    from model.data.synth.writer import is_synthetic_dataset

    check_world(world)
    output_dir(out, "--out")
    if any(out.iterdir()):
        if not is_synthetic_dataset(out):
            raise StartupError(
                f"--out {out} holds something other than a dataset `mad data synth` wrote: "
                "give a new or empty directory"
            )
        for entry in out.iterdir():  # replaced whole: no stale images stay
            shutil.rmtree(entry)
    main(out, train, val, seed, workers, world)


@data_app.command("sheet", cls=PlainHelpCommand)
@one_line_errors
def data_sheet(
    out: Path = typer.Option(..., help="PNG to write."),
    world: str = typer.Option("v2", help="Synthetic world: v1, v2 or v3."),
    seed: int = typer.Option(0, help="Random seed."),
    count: int = typer.Option(16, min=1, max=64, help="Images on the sheet."),
) -> None:
    """Write a contact sheet of synthetic images with their boxes, masks, keypoints and
    first caption drawn on."""
    from model.data.synth.sheet import main

    check_world(world)
    if out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out} is not a .png file", param_hint="--out")
    main(output_file(out, "--out"), world, seed, count)


@data_app.command("merge", cls=PlainHelpCommand)
def data_merge(
    sources: list[Path] = typer.Argument(..., help="COCO-layout datasets to merge."),
    out: Path = typer.Option(..., help="Output directory (must be new or empty)."),
    repeat: list[int] = typer.Option(
        [], help="Times to list each source's training images, one per source (default 1 each)."
    ),
) -> None:
    """Merge COCO-layout datasets with the same categories into one (re-numbered
    annotations, images linked, not copied), e.g. to mix synthetic worlds for training."""
    from model.data.merge import MergeError, merge_datasets

    try:
        counts = merge_datasets(sources, out, repeat or None)
    except MergeError as exc:
        raise typer.BadParameter(str(exc)) from None
    for split, images in counts.items():
        print(f"{out / split}: {images} images")
