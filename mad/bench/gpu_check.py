"""The one-shot GPU check (`scripts/gpu-check`): the figures a short GPU window must produce.

Runs on a bare GPU machine with only a preinstalled torch (the checkout on PYTHONPATH, the few
missing pure-Python packages carried as wheels) and, with `--device cpu --quick`, in CI so it
cannot rot. Sections, each timed and each failure recorded rather than fatal:

  parity   the bundled model on the device vs on the CPU: raw logits (fp32 with TF32 off,
           and bf16 autocast) and the decoded results of the whole pipeline;
  r50      the paper-sized model (random weights) at 800x1333, four tasks, `kept` detections,
           default schedules, batch 1 and 8, under each runner variant; and the
           autoregressive baseline (key/value cache) on the same network;
  bundled  the bundled model the same way;
  http     the HTTP service on the device under a short load (when FastAPI is importable).

A time budget keeps the whole run inside a short window: a section that would start past it
is skipped and says so. One JSON and one Markdown report go to --out, rewritten after every
section, so that a run cut off from outside (a window's time limit) keeps what it finished.
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mad.bench.gpu_parity import parity, release
from mad.bench.stats import median, ratio

if TYPE_CHECKING:
    from PIL import Image

Echo = Callable[[str], object]

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "mad-gpu-check/1"
# name -> TorchRunner options. Everything but fp32 needs CUDA.
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "bf16+compile": {"precision": "bf16", "compile": True},
    "bf16+cuda-graphs": {"precision": "bf16", "cuda_graphs": True},
    "bf16+compile+cuda-graphs": {"precision": "bf16", "compile": True, "cuda_graphs": True},
}


@dataclass
class CheckSettings:
    device: str
    quick: bool
    budget_s: float
    repeats: int
    warmup: int
    ar_repeats: int
    kept: int
    batches: tuple[int, ...]
    r50_size: tuple[int, int]
    parity_images: int
    variants: tuple[str, ...]

    @classmethod
    def make(cls, device: str, quick: bool, budget_s: float | None) -> CheckSettings:
        cuda = device.startswith("cuda")
        variants = tuple(VARIANTS) if cuda else ("fp32",)
        if quick:
            return cls(
                device,
                True,
                budget_s or 600.0,
                2,
                1,
                1,
                2,
                (1, 2),
                (128, 192),
                2,
                variants if cuda else ("fp32",),
            )
        return cls(device, False, budget_s or 450.0, 20, 3, 3, 7, (1, 8), (800, 1333), 8, variants)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver=driver_version(),
        )
    else:
        info["name"] = "cpu"
    return info


# --- timing ---------------------------------------------------------------------------------
def time_variants(
    checkpoint: Path, settings: CheckSettings, budget: Budget, echo: Echo, ar: bool
) -> dict[str, Any]:
    """Stage latency of every variant at every batch size; the AR baseline at batch 1."""
    from mad.bench.model_bench import schedules
    from mad.bench.workload import load_model, synthetic_image

    mad = load_model(checkpoint)
    image = synthetic_image(mad.config.image_size)
    ratios = schedules(mad, {})
    del mad
    release()
    out: dict[str, Any] = {"batches": {}, "skipped": {}}
    for batch in settings.batches:
        rows: dict[str, Any] = {}
        for name in settings.variants:
            if budget.left() < 20:
                rows[name] = {"skipped": f"time budget ({settings.budget_s:.0f} s) spent"}
                continue
            started = time.perf_counter()
            try:
                rows[name] = time_variant(
                    checkpoint,
                    settings,
                    name,
                    [image] * batch,
                    ratios,
                    out,
                    echo,
                    ar=ar and batch == 1 and name == "fp32",
                )
            except Exception as exc:  # one variant failing must not cost the others
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            release()  # the variant's model, runner and graphs died with time_variant
            rows[name]["seconds"] = round(time.perf_counter() - started, 1)
            echo(f"  batch {batch} {name}: {fmt_ms(rows[name])}")
        base = median(rows.get("fp32", {}).get("total"))
        for row in rows.values():
            total_ms = median(row.get("total"))
            if total_ms:
                row["speedup_vs_fp32"] = ratio(base, total_ms)
                row["images_per_s"] = batch / (total_ms / 1000)
        out["batches"][str(batch)] = rows
    out["throughput_batch_vs_1"] = batch_gain(out["batches"])
    return out


def time_variant(
    checkpoint: Path,
    settings: CheckSettings,
    name: str,
    images: list[Image.Image],
    ratios: dict[str, list[float]],
    out: dict[str, Any],
    echo: Echo,
    ar: bool,
) -> dict[str, Any]:
    """One variant at one batch size (and, with `ar`, the autoregressive baseline into out)."""
    from mad.bench.model_bench import ModelBench, mad_vs_autoregressive
    from runtime.backends import create_runner

    model, runner = create_runner("torch", checkpoint, settings.device, **VARIANTS[name])
    bench = ModelBench(model, runner, images, settings.kept, ratios)
    # Compiled variants compile (and graphs capture) during warm-up.
    warmup = max(settings.warmup, 2 if name != "fp32" else 0)
    result = bench.stage_latency(settings.repeats, warmup)
    if ar:
        echo("  autoregressive baseline")
        out["mad_vs_ar"] = mad_vs_autoregressive(
            bench, settings.repeats, settings.ar_repeats, settings.warmup
        )
    return {
        "total": result["total"],
        "stages_ms": {k: v["median_ms"] for k, v in result["stages"].items()},
        "passes": result["passes"],
        "sequences": result["sequences"],
        "runner": runner.describe(),
    }


def batch_gain(batches: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Images per second at the largest batch over batch 1, per variant."""
    if "1" not in batches or len(batches) < 2:
        return {}
    top = max(batches, key=int)
    return {
        name: ratio(row.get("images_per_s"), batches["1"].get(name, {}).get("images_per_s"))
        for name, row in batches[top].items()
    }


def fmt_ms(row: dict[str, Any]) -> str:
    if "total" in row:
        return f"{median(row['total']):.1f} ms"
    return row.get("error") or row.get("skipped") or "?"


# --- parity ---------------------------------------------------------------------------------
SECTIONS = ("parity", "r50", "bundled", "http")


def run_check(
    device: str,
    quick: bool,
    out_dir: Path,
    budget_s: float | None = None,
    skip: tuple[str, ...] = (),
    echo: Echo = print,
) -> dict[str, Any]:
    import tempfile

    from mad.bench.environment import environment, now
    from mad.bench.workload import BUNDLED_CHECKPOINT, prepare_checkpoint

    settings = CheckSettings.make(device, quick, budget_s)
    budget = Budget(settings.budget_s)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": now(),
        "settings": asdict(settings),
        "device": device_info(device),
        "environment": environment(ROOT),
        "errors": {},
        "skipped": {},
        "seconds": {},
    }

    from mad.bench.gpu_report import write_check_report

    def save(finished: bool) -> list[str]:
        report["duration_s"] = round(budget.elapsed(), 1)
        report["finished"] = finished
        return [str(p) for p in write_check_report(report, out_dir)]

    def section(name: str, fn: Callable[[], dict[str, Any]], minimum_s: float = 30) -> None:
        if budget.left() < minimum_s:
            report["skipped"][name] = f"time budget ({settings.budget_s:.0f} s) spent"
            return
        echo(f"[{name}]")
        started = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:600]
            echo(f"  ERROR {report['errors'][name]}")
        report["seconds"][name] = round(time.perf_counter() - started, 1)
        save(finished=False)

    def wanted(name: str) -> bool:
        if name in skip:
            report["skipped"][name] = "--skip"
        return name not in skip

    with tempfile.TemporaryDirectory(prefix="mad-gpu-check-") as tmp:
        if wanted("parity"):
            section(
                "parity",
                lambda: parity(BUNDLED_CHECKPOINT, settings.device, settings.parity_images),
            )
        if wanted("r50"):
            r50, _ = prepare_checkpoint("r50", None, settings.r50_size, Path(tmp))
            # The AR baseline of r50 takes minutes on a CPU: the quick run uses the small model.
            section("r50", lambda: time_variants(r50, settings, budget, echo, ar=not quick))
        if wanted("bundled"):
            section(
                "bundled",
                lambda: time_variants(BUNDLED_CHECKPOINT, settings, budget, echo, ar=quick),
            )
    if wanted("http"):
        if importlib.util.find_spec("fastapi") is None:
            report["skipped"]["http"] = "FastAPI is not installed here"
        else:
            section("http", lambda: http_load(settings, echo), minimum_s=60)
    report["paths"] = save(finished=True)
    return report


def http_load(settings: CheckSettings, echo: Echo) -> dict[str, Any]:
    """`mad serve` on the device (bf16 + CUDA graphs on a GPU), batching off and on."""
    from mad.bench.http_bench import http_benchmark
    from mad.bench.workload import BUNDLED_CHECKPOINT, jpeg_bytes, load_model, synthetic_image

    mad = load_model(BUNDLED_CHECKPOINT)
    payload = jpeg_bytes(synthetic_image(mad.config.image_size))
    tasks = list(mad.config.tasks)
    del mad
    release()
    cuda = settings.device.startswith("cuda")
    options = VARIANTS["bf16+cuda-graphs"] if cuda else {}
    levels = [1, 2] if settings.quick else [1, 8]
    return {
        "runner_options": options,
        **http_benchmark(
            BUNDLED_CHECKPOINT,
            "torch",
            settings.device,
            payload,
            tasks,
            settings.kept,
            {},
            levels,
            4 if settings.quick else 200,
            1.0 if settings.quick else 6.0,
            settings.repeats,
            settings.warmup,
            batch_sizes=(1, max(settings.batches)),
            echo=echo,
            runner_options=options,
            windows=("adaptive",),  # the default; the fixed window is `mad bench`'s comparison
        ),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CI smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="report folder")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds before later sections are skipped (450; quick 600)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=SECTIONS,
        help="a section not to run (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "gpu-check: torch sees no CUDA device here; use --device cpu\n")

    def echo(text: str) -> None:
        print(text, flush=True)

    report = run_check(args.device, args.quick, args.out, args.budget_s, tuple(args.skip), echo)
    from mad.bench.gpu_report import headline

    echo(headline(report))
    for path in report["paths"]:
        echo(f"wrote {path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
