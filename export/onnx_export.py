"""`export_onnx`: a checkpoint -> a self-contained export directory.

manifest.json             what the runtimes read (runtime/manifest.py, docs/export.md)
encoder.onnx              images + pad mask -> stacked cross-attention keys/values + mask
decoder_<task>.onnx       memory + tokens + image_index -> logits over the task's slice
config.json, tokenizer.model   copied from the checkpoint, for the codecs
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from export import graphs as g
from model.checkpoint import CONFIG, checkpoint_digest, load_checkpoint
from model.codecs import TaskCodec
from model.network import ImageMemory, MADNetwork
from model.startup import StartupError
from runtime.manifest import FORMAT, MANIFEST, write_manifest

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
VERIFY_TOLERANCE = 1e-3  # fp32 ONNX Runtime vs eager PyTorch, max abs logit difference


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = MIN_OPSET,
    simplify: bool = False,
    exporter: str = "torchscript",
    verify: bool = True,
) -> dict[str, Any]:
    """Export `checkpoint` into `out` and return the manifest written there.

    exporter "torchscript" (the default) is the legacy tracer; "dynamo" is torch.export and
    needs the onnxscript package (see docs/export.md for why torchscript is the default).
    verify: run both graphs in ONNX Runtime at shapes other than the tracing example and
    fail unless they match eager PyTorch within VERIFY_TOLERANCE.
    """
    if opset < MIN_OPSET:
        raise StartupError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if exporter not in EXPORTERS:
        raise StartupError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise StartupError(
                "the dynamo exporter needs onnxscript (`pip install onnxscript`); "
                "or use --exporter torchscript, the default"
            ) from e
    checkpoint, out = Path(checkpoint), Path(out)
    mad, meta = load_checkpoint(checkpoint, "cpu")
    network = mad.required_network().eval()
    out.mkdir(parents=True, exist_ok=True)
    # Written last, after the graphs: until then `out` is not an export, so an interrupted
    # re-export is never taken for the one it was replacing.
    (out / MANIFEST).unlink(missing_ok=True)
    encoder_example, decoder_example = g.example_inputs(network)
    single_example = g.example_inputs(network, batch=1)[1]

    graphs = {
        "encoder": _export(
            g.EncoderGraph(network),
            encoder_example,
            out / "encoder.onnx",
            g.ENCODER_INPUTS,
            g.ENCODER_OUTPUTS,
            g.ENCODER_AXES,
            opset,
            exporter,
            simplify,
        )
    }
    decoders = {}
    for task, codec in mad.codecs.items():
        path = out / f"decoder_{task}.onnx"
        graph = g.DecoderGraph(network, codec.vocab_slice())
        decoders[task] = _export(
            graph,
            decoder_example,
            path,
            g.DECODER_INPUTS,
            g.DECODER_OUTPUTS,
            g.DECODER_AXES,
            opset,
            exporter,
            simplify,
        )
        decoders[task].update(vocab_slice=list(codec.vocab_slice()), seq_len=codec.seq_len)
        single = g.DecoderGraph(network, codec.vocab_slice(), single_image=True)
        decoders[task]["single_image"] = _export(
            single,
            single_example,
            out / f"decoder_{task}_single.onnx",
            g.DECODER_INPUTS,
            g.DECODER_OUTPUTS,
            g.SINGLE_IMAGE_AXES,
            opset,
            exporter,
            simplify,
        )
    graphs["decoders"] = decoders

    for name in (CONFIG, meta["tokenizer"]):
        if name:
            shutil.copyfile(checkpoint / name, out / name)
    manifest = {
        "format": FORMAT,
        "formats": ["onnx"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": {
            "path": str(checkpoint.resolve()),
            "sha256": checkpoint_digest(checkpoint),
            "step": meta.get("step"),
        },
        "model": mad.config.to_dict(),
        "config_file": CONFIG,
        "tokenizer_file": meta["tokenizer"],
        "opset": opset,
        "exporter": exporter,
        "simplified": simplify,
        "precision": "fp32",
        "memory": {
            "layers": len(network.decoder),
            "heads": network.config.n_heads,
            "head_dim": network.config.d_model // network.config.n_heads,
            "strides": list(network.backbone.strides),  # the levels, finest first
        },
        "graphs": graphs,
        "versions": versions(),
    }
    if verify:
        manifest["verification"] = verify_export(out, manifest, network, mad.codecs)
    write_manifest(out, manifest)
    return manifest


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor | None, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    exporter: str,
    simplify: bool,
) -> dict[str, Any]:
    import onnx

    with warnings.catch_warnings():
        # The tracer warns about the Python size-1 branches; example_inputs explains why the
        # traced branch is the general one. The legacy exporter's deprecation is known.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if exporter == "dynamo":
            dim = torch.export.Dim.DYNAMIC
            shapes = tuple({i: dim for i in axes.get(name, {})} for name in inputs)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(inputs),
                output_names=list(outputs),
                opset_version=opset,
                dynamic_shapes=shapes,
            )
            if program is None:  # only the legacy exporter returns none
                raise RuntimeError(f"the dynamo exporter returned no program for {path.name}")
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(inputs),
                output_names=list(outputs),
                opset_version=opset,
                dynamic_axes={k: v for k, v in axes.items()},
                do_constant_folding=True,
            )
    if simplify:
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    got = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:  # the dynamo exporter may fail to convert down from its own opset
        raise RuntimeError(f"{path.name} came out at opset {got}, not {opset}; ask for {got}")
    return {"file": path.name, **graph_io(model)}


def graph_io(model: onnx.ModelProto) -> dict[str, Any]:
    """Names, dtypes and shapes (ints, or the names of dynamic axes) of a graph's IO."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def describe(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "dtype": str(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


@torch.no_grad()
def verify_export(
    out: Path, manifest: dict[str, Any], network: MADNetwork, codecs: dict[str, TaskCodec]
) -> dict[str, Any]:
    """ONNX Runtime (CPU, fp32) vs eager at batch 3, 5 sequences and an image size other than
    the tracing example's, so the dynamic axes are exercised, not just declared."""
    import onnxruntime as ort

    height, width = network.config.image_size
    images = torch.rand(3, 3, height - 16, width + 16, generator=torch.Generator().manual_seed(0))
    pad_mask = torch.zeros(3, height - 16, width + 16, dtype=torch.bool)
    pad_mask[1, height // 3 :] = True
    memory = network.encode(images, pad_mask)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    encoder = ort.InferenceSession(
        str(out / manifest["graphs"]["encoder"]["file"]),
        options,
        providers=["CPUExecutionProvider"],
    )
    keys, values, mask = encoder.run(None, {"images": images.numpy(), "pad_mask": pad_mask.numpy()})
    worst = 0.0
    for task, graph in manifest["graphs"]["decoders"].items():
        tokens = torch.randint(0, network.vocab.size, (5, codecs[task].seq_len))
        index = torch.tensor([2, 0, 1, 2, 0])
        expected = network.decode(memory, tokens, index, tuple(graph["vocab_slice"])).numpy()
        session = ort.InferenceSession(
            str(out / graph["file"]), options, providers=["CPUExecutionProvider"]
        )
        (logits,) = session.run(
            None,
            {
                "keys": keys,
                "values": values,
                "mask": mask,
                "tokens": tokens.numpy(),
                "image_index": index.numpy(),
            },
        )
        worst = max(worst, float(np.abs(logits - expected).max()))
        if "single_image" in graph:  # image 1 alone (the letterboxed one), 5 sequences
            alone = ImageMemory(
                [(k[1:2], v[1:2]) for k, v in memory.kv],
                None if memory.mask is None else memory.mask[1:2],
            )
            zero = torch.zeros(5, dtype=torch.long)
            expected = network.decode(alone, tokens, zero, tuple(graph["vocab_slice"])).numpy()
            session = ort.InferenceSession(
                str(out / graph["single_image"]["file"]),
                options,
                providers=["CPUExecutionProvider"],
            )
            feed = {
                "keys": keys[:, 1:2],
                "values": values[:, 1:2],
                "mask": mask[1:2],
                "tokens": tokens.numpy(),
                "image_index": zero.numpy(),
            }
            names = {i.name for i in session.get_inputs()}  # one image: image_index is dropped
            (logits,) = session.run(None, {k: v for k, v in feed.items() if k in names})
            worst = max(worst, float(np.abs(logits - expected).max()))
    if worst > VERIFY_TOLERANCE:
        raise RuntimeError(
            f"exported graphs differ from PyTorch by {worst:.2e} (tolerance {VERIFY_TOLERANCE})"
        )
    return {
        "max_abs_logit_diff": worst,
        "tolerance": VERIFY_TOLERANCE,
        "batch": 3,
        "sequences": 5,
        "image_size": [height - 16, width + 16],
        "provider": "CPU",
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in (
        "mad-serve",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxslim",
        "onnxscript",
        "tensorrt",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found
