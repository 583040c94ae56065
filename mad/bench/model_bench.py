"""In-process model benchmarks: stage latency, MAD vs autoregressive, kept vs fixed sequences,
and (on GPU) precision / compilation / runtime variants.

The stages are the pipeline's (model/batch_run.py) run one by one, in the model's task order,
with a fixed workload: the tasks prompted by detections (segmentation, keypoints) are prompted
by exactly `kept` boxes per image instead of by whatever a (possibly random-weight) detector
lets through, so timings compare across checkpoints and runs.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mad.bench.stats import measure, median, ratio, summarize
from mad.bench.workload import detection_prompts
from model.autoregressive import autoregressive_decode
from model.checkpoint import MAD
from model.codecs import DecodeContext
from model.decoding import Runner, decoder_passes, mask_schedule, masked_decode
from model.network import ImageMemory
from model.pipeline import torch_threads
from model.preprocess import ImageBatch, prepare_batch
from model.runner import EagerRunner
from model.stopwatch import Stopwatch


def schedules(mad: MAD, refine_steps: dict[str, int]) -> dict[str, list[float]]:
    """Mask-ratio schedule per task: K from `refine_steps`, else the checkpoint's default."""
    steps = mad.refine_steps(refine_steps, mad.config.tasks)
    return {task: mask_schedule(k, mad.config.schedules.get(task, [])) for task, k in steps.items()}


# One task's sequences: (prompts [S, P], image_index [S], codec.decode kwargs, contexts [S]).
Sequences = tuple[torch.Tensor, torch.Tensor, dict[str, Any], list[DecodeContext]]


def measure_laps(
    fn: Callable[[], dict[str, float]], repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """fn() -> {stage: seconds}; -> {stage: summary} over `repeats` runs after warm-up."""
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    return {name: summarize([run[name] for run in runs]) for name in runs[0]}


class ModelBench:
    """One model, one runner, one batch of images; every task with a controlled workload."""

    def __init__(
        self,
        mad: MAD,
        runner: Runner[Any],
        images: list[Image.Image],
        kept: int,
        ratios: dict[str, list[float]],
    ) -> None:
        self.mad, self.runner, self.images, self.kept = mad, runner, images, kept
        self.ratios = ratios
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self.tasks = list(mad.codecs)  # model order: detection before the tasks it prompts

    def preprocess(self) -> ImageBatch:
        return prepare_batch(self.images, self.mad.config.image_size, self.device)

    def sequences(
        self, task: str, contexts: list[DecodeContext], per_image: int | None = None
    ) -> Sequences:
        """-> (prompts [S, P], image_index [S], codec.decode kwargs, contexts of the S)."""
        codec = self.mad.codecs[task]
        if codec.prompted_by_detections:
            tokens, owners, boxes, ctx = detection_prompts(
                self.mad, self.kept if per_image is None else per_image, contexts
            )
            return codec.prompts(tokens), owners, {"boxes": boxes}, ctx
        return codec.prompts(len(contexts)), torch.arange(len(contexts)), {}, contexts

    def decode(self, task: str, memory: Any, seqs: Sequences, ratios: list[float]) -> torch.Tensor:
        prompts, owners = seqs[0].to(self.device), seqs[1].to(self.device)
        return masked_decode(self.runner, memory, self.mad.codecs[task], prompts, owners, ratios)

    def postprocess(self, task: str, logits: torch.Tensor, seqs: Sequences) -> list[Any]:
        return self.mad.codecs[task].decode(logits.cpu(), None, seqs[3], **seqs[2])

    def passes(self, task: str) -> int:
        return decoder_passes(self.mad.codecs[task], self.ratios[task])

    def run(self) -> dict[str, float]:
        """One image batch through every task -> seconds per stage (and total); the torch
        work between the graphs on as many threads as the pipeline gives it."""
        with torch_threads(getattr(self.runner, "host_threads", None)):
            return self._run()

    def _run(self) -> dict[str, float]:
        laps = Stopwatch(self.device)
        tensors, pads, contexts = self.preprocess()
        laps.lap("preprocess")
        memory = self.runner.encode(tensors, pads)
        laps.lap("encode")
        outputs: dict[str, tuple[torch.Tensor, Sequences]] = {}
        for task in self.tasks:
            seqs = self.sequences(task, contexts)
            outputs[task] = (self.decode(task, memory, seqs, self.ratios[task]), seqs)
            laps.lap(task)
        for task, (logits, seqs) in outputs.items():
            self.postprocess(task, logits, seqs)
        laps.lap("postprocess")
        return {**laps.times, "total": laps.total()}

    def stage_latency(self, repeats: int, warmup: int) -> dict[str, Any]:
        stages = measure_laps(self.run, repeats, warmup)
        _, _, contexts = self.preprocess()
        return {
            "stages": stages,
            "total": stages.pop("total"),
            "passes": {t: self.passes(t) for t in self.tasks},
            "sequences": {t: len(self.sequences(t, contexts)[0]) for t in self.tasks},
            "schedules": {t: self.ratios[t] for t in self.tasks},
        }

    def encoded(self) -> tuple[tuple[torch.Tensor, torch.Tensor], Any, list[DecodeContext]]:
        """-> ((images, pad_mask), the runner's encoding of them, their contexts)."""
        tensors, pads, contexts = self.preprocess()
        return (tensors, pads), self.runner.encode(tensors, pads), contexts


def mad_vs_autoregressive(
    bench: ModelBench, repeats: int, ar_repeats: int, warmup: int
) -> dict[str, Any]:
    """Per task: masked decoding with K=0 and with the schedule vs greedy autoregressive
    decoding of the same sequences, with and without the self-attention KV cache. Totals add
    the (shared) image encoding, so they are the model's time for all tasks."""
    runner = bench.runner
    if not isinstance(runner, EagerRunner):
        raise TypeError(
            f"autoregressive decoding needs the PyTorch network, not a {type(runner).__name__}"
        )
    inputs, memory, contexts = bench.encoded()
    device = bench.device
    encode = measure(lambda: runner.encode(*inputs), repeats, warmup, device)

    def ar(task: str, seqs: Sequences, cache: bool) -> torch.Tensor:
        prompts, owners = seqs[0].to(device), seqs[1].to(device)
        with runner.autocast():
            return autoregressive_decode(
                runner.network, memory, bench.mad.codecs[task], prompts, owners, use_cache=cache
            )

    modes = ("mad_k0", "mad_schedule", "ar_cache", "ar_no_cache")
    tasks: dict[str, dict[str, Any]] = {}
    totals = dict.fromkeys(modes, encode["median_ms"])
    ar_warmup = min(warmup, 1) if device.type == "cuda" else 0  # a CPU AR warm-up costs a run
    for task in bench.tasks:
        seqs = bench.sequences(task, contexts)
        tasks[task] = {
            "sequences": len(seqs[0]),
            "tokens": bench.mad.codecs[task].body_len,
            "mad_k0": measure(
                partial(bench.decode, task, memory, seqs, []), repeats, warmup, device
            ),
            "mad_schedule": measure(
                partial(bench.decode, task, memory, seqs, bench.ratios[task]),
                repeats,
                warmup,
                device,
            ),
            "ar_cache": measure(partial(ar, task, seqs, True), ar_repeats, ar_warmup, device),
            "ar_no_cache": measure(partial(ar, task, seqs, False), ar_repeats, ar_warmup, device),
        }
        for mode in modes:
            totals[mode] += tasks[task][mode]["median_ms"]
    return {
        "encode": encode,
        "tasks": tasks,
        "totals_ms": totals,
        "ratios": {
            "ar_cache_vs_mad_schedule": ratio(totals["ar_cache"], totals["mad_schedule"]),
            "ar_cache_vs_mad_k0": ratio(totals["ar_cache"], totals["mad_k0"]),
            "ar_no_cache_vs_mad_schedule": ratio(totals["ar_no_cache"], totals["mad_schedule"]),
            "ar_no_cache_vs_ar_cache": ratio(totals["ar_no_cache"], totals["ar_cache"]),
        },
    }


def kept_vs_fixed(
    bench: ModelBench, kept: int, fixed: int, repeats: int, warmup: int
) -> dict[str, Any]:
    """The tasks prompted by detections (segmentation, keypoints) prompted by `kept`
    detections per image vs by `fixed` (the paper decodes all num_slots=100 sequences),
    decoding and postprocessing timed apart."""
    _, memory, contexts = bench.encoded()
    tasks = [t for t in bench.tasks if bench.mad.codecs[t].prompted_by_detections]
    out: dict[str, Any] = {"tasks": tasks}
    for name, count in (("kept", kept), ("fixed", fixed)):
        prepared = {t: bench.sequences(t, contexts, count) for t in tasks}

        def run(prepared: dict[str, Sequences] = prepared) -> dict[str, float]:
            laps, logits = Stopwatch(bench.device), {}
            for t in tasks:
                logits[t] = bench.decode(t, memory, prepared[t], bench.ratios[t])
            laps.lap("decode")
            for t in tasks:
                bench.postprocess(t, logits[t], prepared[t])
            laps.lap("postprocess")
            return {**laps.times, "total": laps.total()}

        out[name] = {"per_image": count, **measure_laps(run, repeats, warmup)}
    out["ratio"] = ratio(median(out["fixed"]["total"]), median(out["kept"]["total"]))
    out["ratio_decode_only"] = ratio(median(out["fixed"]["decode"]), median(out["kept"]["decode"]))
    return out


# --- GPU variants -------------------------------------------------------------------------
def gpu_variants(
    checkpoint: Path,
    device: str,
    images: list[Image.Image],
    kept: int,
    refine: dict[str, int],
    repeats: int,
    warmup: int,
    export_dir: Path | None,
) -> dict[str, dict[str, Any]]:
    """The same workload under each GPU option present: bf16 / fp16 autocast, torch.compile,
    CUDA graphs (compile mode reduce-overhead), ONNX Runtime (CUDA/TensorRT providers) and
    TensorRT engines. One failing option (missing library, unsupported op) is recorded, not
    fatal."""
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "torch-fp32": ("torch", {}),
        "torch-bf16": ("torch", {"precision": "bf16"}),
        "torch-fp16": ("torch", {"precision": "fp16"}),
        "torch-fp32-compile": ("torch", {"compile": True}),
        "torch-bf16-cudagraphs": ("torch", {"precision": "bf16", "cudagraphs": True}),
        "onnx": ("onnx", {"export_dir": export_dir}),
        "tensorrt": ("tensorrt", {"export_dir": export_dir}),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (backend, options) in specs.items():
        if backend != "torch" and export_dir is None:
            out[name] = {"error": "no ONNX export (it failed or was not made)"}
            continue
        try:
            out[name] = time_variant(
                checkpoint, device, backend, options, images, kept, refine, repeats, warmup
            )
        except Exception as exc:  # report what could not run and go on
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            gc.collect()  # the variant's model went with time_variant's frame
            torch.cuda.empty_cache()
    base = median(out["torch-fp32"].get("total"))
    for entry in out.values():
        if "total" in entry:
            entry["speedup_vs_fp32"] = ratio(base, median(entry["total"]))
    return out


def time_variant(
    checkpoint: Path,
    device: str,
    backend: str,
    options: dict[str, Any],
    images: list[Image.Image],
    kept: int,
    refine: dict[str, int],
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """One GPU variant's stage latency (see gpu_variants)."""
    from service.model_cache import load_runner

    options = dict(options)
    cudagraphs = options.pop("cudagraphs", False)
    mad, runner = load_runner(backend, checkpoint, device, **options)
    if cudagraphs:
        if not isinstance(runner, EagerRunner):
            raise TypeError(f"CUDA graphs need a torch runner, not a {type(runner).__name__}")
        use_cuda_graphs(runner)
    bench = ModelBench(mad, runner, images, kept, schedules(mad, refine))
    # Compiled variants compile (and capture graphs) during warm-up.
    result = bench.stage_latency(repeats, max(warmup, 3 if backend == "torch" else 1))
    return {
        "total": result["total"],
        "encode": result["stages"]["encode"],
        "describe": runner.describe(),
    }


def use_cuda_graphs(runner: EagerRunner) -> None:
    """Compile a TorchRunner with mode="reduce-overhead": static shapes replayed as CUDA graphs
    (one graph per task shape), which removes the kernel-launch cost of small decoder passes."""
    network = runner.network
    encode = torch.compile(network.encode, mode="reduce-overhead", dynamic=False)
    runner._decode = torch.compile(network.decode, mode="reduce-overhead", dynamic=False)

    def encode_step(images: torch.Tensor, pad_mask: torch.Tensor | None = None) -> ImageMemory:
        torch.compiler.cudagraph_mark_step_begin()  # a new image batch: old outputs are dead
        return encode(images, pad_mask)

    runner._encode = encode_step
