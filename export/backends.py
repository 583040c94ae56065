"""Runtime backends behind one interface (`model.decoding.Runner`), chosen by name.

    torch     eager PyTorch (model/runner.py): CPU or CUDA, bf16/fp16 autocast, torch.compile
    onnx      ONNX Runtime on the exported graphs: TensorRT / CUDA / CPU execution providers
    tensorrt  FP16 TensorRT engines built from the exported graphs (NVIDIA GPUs)

Everything that can fail does so here, at start-up: a missing library, a missing GPU, an
export made from another checkpoint. Never at the first request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from model.checkpoint import MAD, TOKENIZER, WEIGHTS, checkpoint_digest, load_checkpoint
from model.codecs import build_codecs
from model.config import ModelConfig
from model.runner import TorchRunner
from model.tokenizer import CaptionTokenizer
from model.vocab import VocabLayout

BACKENDS = ("torch", "onnx", "tensorrt")


def create_runner(backend: str, checkpoint: str | Path | None, device: str = "cpu", **options
                  ) -> tuple[MAD, object]:
    """-> (model bundle, runner).

    torch options: precision ("fp32", "bf16", "fp16"), compile (bool), cuda_graphs (bool).
    onnx / tensorrt options: export_dir (else the checkpoint is exported into the cache, see
    `cached_export`), opset, simplify; onnx: threads, providers; tensorrt: profile
    (export.tensorrt.Profile), rebuild. `checkpoint` may itself be an export dir.
    For onnx/tensorrt the bundle carries config, vocabulary, tokenizer and codecs but
    network=None: the weights live in the graphs, not in this process.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        if checkpoint is None:
            raise ValueError("the torch backend needs a checkpoint")
        mad, _ = load_checkpoint(checkpoint, "cpu")
        return mad, TorchRunner(mad.network, device, options.get("precision", "fp32"),
                                options.get("compile", False), options.get("cuda_graphs", False))
    if backend == "tensorrt":
        from export.tensorrt import import_tensorrt

        import_tensorrt()  # before any export work: say what is missing first
    export_dir = resolve_export_dir(checkpoint, options.get("export_dir"),
                                    options.get("opset", 17), options.get("simplify", False))
    if backend == "onnx":
        from export.onnx_runner import OnnxRunner

        runner = OnnxRunner(export_dir, device, options.get("threads"), options.get("providers"))
    else:
        from export.tensorrt import TensorRTRunner

        runner = TensorRTRunner(export_dir, "cuda" if device == "auto" else device,
                                options.get("profile"), options.get("rebuild", False))
    return load_bundle(export_dir), runner


def resolve_export_dir(checkpoint, export_dir, opset: int = 17, simplify: bool = False) -> Path:
    """The export dir to serve: the one given (checked against the checkpoint, if any), the
    checkpoint itself when it is an export, else the cached export of the checkpoint."""
    from export.onnx_export import MANIFEST, read_manifest

    if export_dir is None and checkpoint is not None and (Path(checkpoint) / MANIFEST).is_file():
        export_dir, checkpoint = checkpoint, None
    if export_dir is None:
        if checkpoint is None:
            raise ValueError("give a checkpoint or an export_dir")
        return cached_export(checkpoint, opset, simplify)
    manifest = read_manifest(export_dir)  # raises if it is not an export
    if checkpoint is not None and (Path(checkpoint) / WEIGHTS).is_file():
        digest = checkpoint_digest(checkpoint)
        if manifest["checkpoint"]["sha256"] != digest:
            raise ValueError(f"{export_dir} was exported from checkpoint "
                             f"{manifest['checkpoint']['sha256'][:16]}, not from {checkpoint} "
                             f"({digest[:16]}); re-export it or drop one of the two")
    return Path(export_dir)


def cache_root() -> Path:
    return Path(os.environ.get("MAD_CACHE_DIR") or Path.home() / ".cache" / "mad-serve")


def cached_export(checkpoint: str | Path, opset: int = 17, simplify: bool = False) -> Path:
    """`<cache>/<sha256[:16]>/onnx`: exported once per checkpoint content, reused after.
    A new export is written beside it and renamed into place, so concurrent starts never see
    half an export (the loser of the race just drops its copy)."""
    from export.onnx_export import FORMAT, MANIFEST, export_onnx, read_manifest

    digest = checkpoint_digest(checkpoint)
    target = cache_root() / digest[:16] / "onnx"
    if (target / MANIFEST).is_file():
        try:
            manifest = read_manifest(target)
        except ValueError:
            manifest = {}
        if (manifest.get("format") == FORMAT and manifest["checkpoint"]["sha256"] == digest
                and manifest["opset"] == opset and manifest["simplified"] == simplify):
            return target
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="onnx-", dir=target.parent))
    try:
        export_onnx(checkpoint, staging, opset=opset, simplify=simplify)
        staging.rename(target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_bundle(export_dir: str | Path) -> MAD:
    """Config, vocabulary, tokenizer and codecs from an export dir (no weights)."""
    from export.onnx_export import read_manifest

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    config = ModelConfig.from_dict(manifest["model"])
    name = manifest.get("tokenizer_file")
    tokenizer = CaptionTokenizer.load(export_dir / (name or TOKENIZER)) if name else None
    if tokenizer is not None:
        config.text_vocab_size = tokenizer.vocab_size
    vocab = VocabLayout.from_config(config)
    return MAD(config, vocab, tokenizer, build_codecs(config, vocab, tokenizer), network=None)
