"""Runtime backends behind one interface (`model.decoding.Runner`), chosen by name.

    torch     PyTorch (runtime/torch_runner.py): CPU or CUDA, bf16/fp16 autocast, torch.compile,
              CUDA graphs; runs a checkpoint
    onnx      ONNX Runtime on the exported graphs: TensorRT / CUDA / CPU execution providers;
              fp32, or int8 from a quantised export (`mad export --quantize int8`)
    tensorrt  FP16 TensorRT engines built from the exported graphs (NVIDIA GPUs)
    openvino  OpenVINO on the exported fp32 graphs, CPU only, at fp32 or bf16

onnx, tensorrt and openvino run an export that already exists (`mad export`); making one is
the caller's decision (the service exports into its cache at start-up: service/model_cache.py).
Everything that can fail does so here, at start-up: a missing library, a missing GPU, an
export made from another checkpoint. Never at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.checkpoint import CONFIG, MAD, TOKENIZER, WEIGHTS, checkpoint_digest, load_checkpoint
from model.codecs import build_codecs
from model.config import ModelConfig
from model.decoding import Runner
from model.startup import StartupError, install_hint
from model.tokenizer import CaptionTokenizer
from model.vocab import VocabLayout
from runtime.manifest import is_export, read_manifest
from runtime.torch_runner import TorchRunner, check_torch_options

BACKENDS = ("torch", "onnx", "tensorrt", "openvino")


def create_runner(
    backend: str, checkpoint: str | Path | None, device: str = "cpu", **options: Any
) -> tuple[MAD, Runner[Any]]:
    """-> (model bundle, runner).

    torch options: precision ("fp32", "bf16", "fp16"), compile (bool), cuda_graphs (bool),
    threads (intra-op threads while it runs; None: unchanged).
    onnx / tensorrt / openvino options: export_dir (else `checkpoint` must itself be an export dir);
    onnx: precision ("fp32", "int8": what the export must hold), threads, providers.
    openvino: precision ("fp32", "bf16": how it runs an fp32 export), threads.
    tensorrt needs engines built for this GPU in the export (export.tensorrt.build_engines);
    engines: the manifest entry build_engines returned (else the manifest's, read now).
    Other options are ignored.
    For the export backends the bundle carries config, vocabulary, tokenizer and codecs but
    network=None: the weights live in the graphs, not in this process.
    """
    check_options(backend, checkpoint, device, **options)
    if backend == "torch":
        assert checkpoint is not None  # check_options says so otherwise
        mad, _ = load_checkpoint(checkpoint, "cpu")
        return mad, TorchRunner(
            mad.required_network(),
            device,
            options.get("precision", "fp32"),
            options.get("compile", False),
            options.get("cuda_graphs", False),
            options.get("threads"),
        )
    export_dir = resolve_export_dir(checkpoint, options.get("export_dir"), backend)
    runner: Runner[Any]
    if backend == "onnx":
        from runtime.onnx_runner import OnnxRunner

        runner = OnnxRunner(export_dir, device, options.get("threads"), options.get("providers"))
    elif backend == "openvino":
        from runtime.openvino_runner import OpenVinoRunner

        runner = OpenVinoRunner(
            export_dir, options.get("precision", "fp32"), options.get("threads")
        )
    else:
        from runtime.tensorrt_runner import TensorRTRunner

        runner = TensorRTRunner(export_dir, device, options.get("engines"))
    return load_bundle(export_dir), runner


def check_options(
    backend: str, checkpoint: str | Path | None, device: str = "cpu", **options: Any
) -> None:
    """The start-up checks that need no model, each a StartupError naming the fix: they take
    milliseconds, so they run before a server binds its port or an export starts. Options
    as create_runner's."""
    if backend not in BACKENDS:
        raise StartupError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if checkpoint is not None and not (Path(checkpoint) / CONFIG).is_file():
        raise StartupError(
            f"no checkpoint or export at {checkpoint} ({CONFIG} missing); "
            "check --checkpoint (or MAD_CHECKPOINT)"
        )
    export_dir = options.get("export_dir") if backend != "torch" else None
    if export_dir is not None:
        read_manifest(export_dir)  # raises when it is not an export
    elif (
        checkpoint is not None
        and not is_export(checkpoint)
        and not (Path(checkpoint) / WEIGHTS).is_file()
    ):  # a checkpoint is run (torch) or exported at start-up (onnx, tensorrt): weights needed
        raise StartupError(
            f"{checkpoint} has a {CONFIG} but no {WEIGHTS}: an incomplete checkpoint (an "
            "interrupted copy or training run?); check --checkpoint (or MAD_CHECKPOINT)"
        )
    if backend == "torch":
        if checkpoint is None:
            raise StartupError("the torch backend needs a checkpoint; pass --checkpoint")
        if is_export(checkpoint):
            raise StartupError(
                f"{checkpoint} is an ONNX export, not a checkpoint: run it with --backend onnx "
                "(or tensorrt, openvino), or pass the checkpoint it was exported from"
            )
        check_torch_options(
            device, options.get("precision", "fp32"), options.get("cuda_graphs", False)
        )
    elif backend == "tensorrt":
        from runtime.tensorrt_runner import cuda_device, import_tensorrt

        import_tensorrt()  # before anything else: say what is missing first
        cuda_device(device)
    elif backend == "openvino":
        from runtime.openvino_runner import check_openvino

        check_openvino(device, options.get("precision", "fp32"))
        export_dir = options.get("export_dir")
        if export_dir is None and checkpoint is not None and is_export(checkpoint):
            export_dir = checkpoint
        if export_dir is not None and (held := read_manifest(export_dir)["precision"]) != "fp32":
            raise StartupError(
                f"{export_dir} is an export at {held}; OpenVINO runs fp32 exports (at fp32 "
                "or bf16): pass one made without --quantize"
            )
    else:
        check_onnx_options(checkpoint, device, **options)


ONNX_PRECISIONS = ("fp32", "int8")


def check_onnx_options(checkpoint: str | Path | None, device: str, **options: Any) -> None:
    """The precision asked for is one ONNX Runtime runs and the export holds; the device has
    a provider."""
    precision = options.get("precision", "fp32")
    if precision not in ONNX_PRECISIONS:
        raise StartupError(
            f"the onnx backend runs fp32 or int8 exports, not {precision!r}; choose fp32 or "
            "int8 (bf16 and fp16: --backend torch)"
        )
    export_dir = options.get("export_dir")
    if export_dir is None and checkpoint is not None and is_export(checkpoint):
        export_dir = checkpoint
    if export_dir is not None:
        held = read_manifest(export_dir)["precision"]
        if held != precision:
            raise StartupError(
                f"{export_dir} is an export at {held} and {precision} was asked for; pass "
                f"--precision {held}, or another export"
            )
    if not options.get("providers"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise StartupError(
                f"the onnx backend needs ONNX Runtime: {install_hint('onnx')}"
            ) from e
        from runtime.onnx_runner import choose_providers

        choose_providers(device, ort.get_available_providers())


def resolve_export_dir(
    checkpoint: str | Path | None, export_dir: str | Path | None, backend: str = "onnx"
) -> Path:
    """The export dir to run: the one given (checked against the checkpoint, if any), or the
    checkpoint itself when it is an export."""
    if export_dir is None and checkpoint is not None and is_export(checkpoint):
        export_dir, checkpoint = checkpoint, None
    if export_dir is None:
        where = f"{checkpoint} is a checkpoint, not an export" if checkpoint else "none given"
        raise StartupError(
            f"the {backend} backend runs an ONNX export ({where}): pass export_dir, "
            "or an export dir as the checkpoint (make one with `mad export`)"
        )
    manifest = read_manifest(export_dir)  # raises if it is not an export
    if checkpoint is not None and (Path(checkpoint) / WEIGHTS).is_file():
        digest = checkpoint_digest(checkpoint)
        if manifest["checkpoint"]["sha256"] != digest:
            raise StartupError(
                f"{export_dir} was exported from checkpoint "
                f"{manifest['checkpoint']['sha256'][:16]}, not from {checkpoint} "
                f"({digest[:16]}); re-export it or drop one of the two"
            )
    return Path(export_dir)


def load_bundle(export_dir: str | Path) -> MAD:
    """Config, vocabulary, tokenizer and codecs from an export dir (no weights)."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    config = ModelConfig.from_dict(manifest["model"])
    name = manifest.get("tokenizer_file")
    tokenizer = CaptionTokenizer.load(export_dir / (name or TOKENIZER)) if name else None
    if tokenizer is not None:
        config.text_vocab_size = tokenizer.vocab_size
    vocab = VocabLayout.from_config(config)
    return MAD(config, vocab, tokenizer, build_codecs(config, vocab, tokenizer), network=None)
