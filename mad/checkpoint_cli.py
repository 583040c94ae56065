"""`mad checkpoint`: convert a checkpoint's weight storage, average checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from mad.help import PlainHelpCommand, new_app, one_line_errors
from model.startup import StartupError, output_dir

checkpoint_app = new_app(help="Checkpoints.", no_args_is_help=True)


def require_new_output(out: Path) -> None:
    """--out: a usage error unless it is new or empty; its parent is made now (a StartupError
    if it cannot be)."""
    from model.checkpoint import is_new_or_empty

    if not is_new_or_empty(out):
        raise typer.BadParameter(
            f"{out} already exists: give a new or empty directory", param_hint="--out"
        )
    output_dir(out.parent, "--out")


@checkpoint_app.command("convert", cls=PlainHelpCommand)
@one_line_errors
def checkpoint_convert(
    source: Path = typer.Argument(..., help="Checkpoint directory."),
    out: Path = typer.Option(..., help="Directory for the converted copy (new or empty)."),
    dtype: str = typer.Option(
        "float16", help="Weight storage: float16, bfloat16 or float32 (the network runs in fp32)."
    ),
) -> None:
    """Copy a checkpoint with its weights stored in another precision: float16 or bfloat16
    halve the file (for shipping; float16 keeps more digits, bfloat16 more range)."""
    from model.checkpoint import WEIGHT_DTYPES, convert_weights

    if not (source / "config.json").is_file():
        raise StartupError(f"{source} is not a checkpoint directory (no config.json)")
    if dtype not in WEIGHT_DTYPES:
        raise typer.BadParameter(
            f"expected one of {', '.join(WEIGHT_DTYPES)}", param_hint="--dtype"
        )
    require_new_output(out)
    written = convert_weights(source, out, dtype)
    size = (written / "model.safetensors").stat().st_size
    print(f"{written}: weights in {dtype}, {size / 1e6:.1f} MB")


@checkpoint_app.command("average", cls=PlainHelpCommand)
@one_line_errors
def checkpoint_average(
    sources: list[Path] = typer.Argument(..., help="Two checkpoint directories or more."),
    out: Path = typer.Option(..., help="Directory for the average (new or empty)."),
) -> None:
    """Average checkpoints' weights into a new one (checkpoint averaging, model soups): for
    checkpoints of one model that descend from one another or from one start, e.g. two
    anneals that each improved different tasks. The first gives the config and schedules."""
    from model.checkpoint import average_weights

    require_new_output(out)
    written = average_weights(sources, out)
    print(f"{written}: the mean of {len(sources)} checkpoints' weights")
