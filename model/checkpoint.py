"""A model bundle (config, vocabulary, tokenizer, codecs, network) and its checkpoint format.

A checkpoint is a directory:
    model.safetensors   the network weights (no pickle: safe to load from anywhere); fp32,
                        or fp16/bf16 after `mad checkpoint convert` (loading upcasts)
    config.json         model config (class and keypoint names in id order, default
                        refinement schedules), tokenizer file name, training step
    tokenizer.model     the SentencePiece caption model
Optimizer and schedule state for resuming live in `train_state.safetensors` + JSON beside them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from model.codecs import DetectionCodec, TaskCodec, build_codecs, decoding_option_names
from model.config import TRAINING_AND_DECODING_FIELDS, ModelConfig
from model.network import MADNetwork
from model.startup import StartupError
from model.tokenizer import CaptionTokenizer
from model.vocab import VocabLayout

FORMAT = "mad-checkpoint/1"
EXPORT_MANIFEST = "manifest.json"  # as runtime/manifest.py names it (model/ imports no runtime/)
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MAD:
    config: ModelConfig
    vocab: VocabLayout
    tokenizer: CaptionTokenizer | None
    codecs: dict[str, TaskCodec]
    network: MADNetwork | None  # None: loaded from an export, the weights live in its graphs

    def required_network(self) -> MADNetwork:
        """The network, for what runs it in this process (a checkpoint's bundle has one)."""
        if self.network is None:
            raise ValueError(
                "this model bundle has no network: it was loaded from an export, "
                "whose weights live in the graphs; load the checkpoint instead"
            )
        return self.network

    def tasks_to_run(self, asked: Sequence[str]) -> tuple[str, ...]:
        """Asked tasks plus detection when a task prompted by detections needs it, model order."""
        needed = set(asked)
        if any(self.codecs[task].prompted_by_detections for task in asked):
            needed.add(DetectionCodec.name)
        return tuple(task for task in self.codecs if task in needed)

    def decoding_options(self) -> list[str]:
        """The decoding options (config fields) of the model's tasks' codecs: how its logits
        are read, which `mad tune --decoding` chooses."""
        return decoding_option_names(self.codecs.values())

    def check_decoding_options(self, names: Iterable[str]) -> None:
        """ValueError unless every name is one of `decoding_options`."""
        known = self.decoding_options()
        for name in names:
            if name not in known:
                raise ValueError(
                    f"{name} is not a decoding option of this model (one of {', '.join(known)})"
                )

    def set_decoding(self, overrides: Mapping[str, Any]) -> None:
        """Read the same weights another way: decoding options set on the config, which the
        codecs read. ValueError, before anything changes, for a key that is not one of
        `decoding_options` or a value the config refuses."""
        self.check_decoding_options(list(overrides))
        dataclasses.replace(self.config, **overrides)  # its checks, before the model changes
        for option, value in overrides.items():
            setattr(self.config, option, value)

    def views(self, asked: Sequence[str]) -> int:
        """Images encoded for a request asking `asked`: 2 when a task it runs also decodes
        on the mirror image (`TaskCodec.reads_mirror_image`), else 1."""
        mirrored = any(self.codecs[task].reads_mirror_image for task in self.tasks_to_run(asked))
        return 2 if mirrored else 1

    def reads_crops(self, asked: Sequence[str]) -> bool:
        """Whether a request asking `asked` runs a task that reads zoomed crops (model.zoom)."""
        return any(self.codecs[task].reads_crops for task in self.tasks_to_run(asked))

    def refine_steps(self, given: Mapping[str, int], tasks: Iterable[str]) -> dict[str, int]:
        """The refinement steps each task runs: `given`'s, else its checkpoint schedule's."""
        return {t: given.get(t, len(self.config.schedules.get(t, []))) for t in tasks}

    @classmethod
    def build(cls, config: ModelConfig, tokenizer: CaptionTokenizer | None = None) -> MAD:
        """A freshly initialised model. The text vocabulary is the tokenizer's, when given."""
        if tokenizer is not None:
            config.text_vocab_size = tokenizer.vocab_size
        vocab = VocabLayout.from_config(config)
        codecs = build_codecs(config, vocab, tokenizer)
        max_len = max(codec.seq_len for codec in codecs.values())
        return cls(config, vocab, tokenizer, codecs, MADNetwork(config, vocab, max_len))


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a .safetensors file with the process's usual permissions (safetensors' save_file
    creates it 0600, which a container running as another user cannot read)."""
    path.write_bytes(save(tensors, metadata=metadata))


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write every file under a temporary name first, then move them into place in order:
    a process killed while saving leaves the previous files whole, not truncated ones."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            partial = directory / f".{name}.partial"
            staged.append((partial, directory / name))  # before writing: a failed write too
            partial.write_bytes(data)
        for partial, path in staged:
            partial.replace(path)
    finally:
        for partial, _ in staged:
            partial.unlink(missing_ok=True)


def save_checkpoint(
    mad: MAD,
    directory: str | Path,
    step: int = 0,
    extra_files: dict[str, bytes] | None = None,
    **metadata: Any,
) -> Path:
    """Write the checkpoint into `directory`, with `extra_files` (a run's training state) moved
    into place before it and config.json last (write_files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    network = mad.required_network()
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    files = {**(extra_files or {}), WEIGHTS: save(state, metadata={"format": FORMAT})}
    if mad.tokenizer is not None:
        files[TOKENIZER] = mad.tokenizer.model_proto
    config = {
        "format": FORMAT,
        "model": mad.config.to_dict(),
        "class_names": mad.config.class_names,
        "keypoint_names": mad.config.keypoint_names,
        "schedules": mad.config.schedules,
        "tokenizer": TOKENIZER if mad.tokenizer is not None else None,
        "step": step,
        **metadata,
    }
    files[CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
    write_files(directory, files)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's (or an export's) config.json; a StartupError naming the file when it
    is missing, not JSON, or not a checkpoint's config."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise StartupError(f"{directory} is not a MAD checkpoint: {CONFIG} missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StartupError(f"{path} cannot be read as JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StartupError(
            f"{path} is not a MAD checkpoint config (format {found!r}; expected {FORMAT!r})"
        )
    if not isinstance(meta.get("model"), dict):
        raise StartupError(f'{path} has no model config (its "model" object is missing)')
    return meta


def write_schedules(
    directory: str | Path,
    schedules: dict[str, list[float]],
    tuning: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Replace a checkpoint's default refinement schedules in its config.json; the weights
    are untouched. `tuning`, {task: how its schedule was chosen}, is stored beside them
    (`schedule_tuning`), keeping the records of tasks tuned earlier."""
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    schedules = {task: [float(r) for r in ratios] for task, ratios in schedules.items()}
    meta["model"]["schedules"] = meta["schedules"] = schedules
    if tuning:
        meta["schedule_tuning"] = tuning_records(meta.get("schedule_tuning")) | tuning
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def write_decoding(
    directory: str | Path, options: dict[str, Any], tuning: dict[str, dict[str, Any]]
) -> None:
    """Set decoding options (ModelConfig fields) in a checkpoint's config.json, with how they
    were chosen, {option: record}, beside the records of options tuned earlier
    (`decoding_tuning`); the weights are untouched."""
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    meta["model"].update(options)
    ModelConfig.from_dict(meta["model"])  # a ValueError, before anything is written
    meta["decoding_tuning"] = dict(meta.get("decoding_tuning") or {}) | tuning
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def tuning_records(record: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A config's `schedule_tuning` as {task: record}; a record written before records were
    kept per task ({data, ..., scores: {task: ...}}) is split by task."""
    if not record:
        return {}
    if "scores" not in record:
        return dict(record)
    shared = {k: v for k, v in record.items() if k not in ("scores", "metrics")}
    return {
        task: {**shared, "metric": record.get("metrics", {}).get(task), "scores": scores}
        for task, scores in record["scores"].items()
    }


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    if (weights.parent / EXPORT_MANIFEST).is_file():
        raise StartupError(
            f"{weights.parent} is an ONNX export, not a checkpoint: pass the checkpoint it was "
            "exported from"
        )
    try:
        return load_file(weights, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise StartupError(
            f"{weights} cannot be read ({exc}): it is damaged or incomplete; copy it again"
        ) from exc


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[MAD, dict[str, Any]]:
    """Rebuild a model from a checkpoint directory -> (model in eval mode, config.json)."""
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    tokenizer = None
    if meta.get("tokenizer"):
        path = directory / str(meta["tokenizer"])
        if not path.is_file():
            raise StartupError(f"{path} is missing: keep each checkpoint's files together")
        tokenizer = CaptionTokenizer.load(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
        config.backbone_weights = None  # the checkpoint already holds them
        mad = MAD.build(config, tokenizer)
    except (ValueError, TypeError) as exc:  # a field of the wrong type or value
        raise StartupError(f"{directory / CONFIG}: the model config is invalid ({exc})") from exc
    network = mad.required_network()
    weights = directory / WEIGHTS
    state = _read_weights(weights)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:  # names or shapes that are not this config's network
        problem = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise StartupError(
            f"{weights} does not fit the network {CONFIG} describes ({problem}); "
            "keep each checkpoint's files together"
        ) from exc
    network.to(device).eval()
    return mad, meta


def convert_weights(source: str | Path, out: str | Path, dtype: str) -> Path:
    """Copy a checkpoint to the new directory `out` with its floating-point weights stored as
    `dtype` (WEIGHT_DTYPES): half the file in float16 or bfloat16, for shipping. The network
    still runs in fp32 (loading upcasts); float16 keeps 11 significant bits (bfloat16 8) and
    refuses weights beyond its range. Training state is not copied: resume from the source.
    The copy appears whole or not at all."""
    source, out = Path(source), Path(out)
    if dtype not in WEIGHT_DTYPES:
        raise StartupError(f"unknown weight dtype {dtype!r}: expected {', '.join(WEIGHT_DTYPES)}")
    _require_new_directory(out)
    meta = read_checkpoint_config(source)
    tokenizer = source / meta["tokenizer"] if meta.get("tokenizer") else None
    if tokenizer is not None and not tokenizer.is_file():
        raise StartupError(f"{tokenizer} is missing: keep each checkpoint's files together")
    state = _read_weights(source / WEIGHTS)
    target = WEIGHT_DTYPES[dtype]
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if target == torch.float16 and tensor.abs().max() > torch.finfo(torch.float16).max:
            raise StartupError(
                f"{name} has weights beyond float16's range ({torch.finfo(torch.float16).max:g}):"
                " use bfloat16"
            )
        state[name] = tensor.to(target)
    meta["weights_dtype"] = dtype
    if meta.get("version"):  # other weights, so another version (service.state.model_version)
        meta["version"] = f"{meta['version']}-{dtype}"
    return _write_copy(state, meta, tokenizer, out)


def average_weights(sources: list[Path], out: str | Path) -> Path:
    """A checkpoint in the new directory `out` whose floating-point weights are the mean of
    the sources' (checkpoint averaging, as model soups do: the sources should descend from
    one another or from one start). The sources must share the network's config (training and
    decoding fields, model.config.TRAINING_AND_DECODING_FIELDS, may differ), the tokenizer and
    the weights' names and shapes; the copy takes the first's config (its schedules, decoding
    options and their tuning records, which describe the first's weights: tune the average
    again) and integer buffers, stores the weights in the first's dtype, and lists the
    sources in config.json (`averaged_from`). Training state is not copied."""
    out = Path(out)
    if len(sources) < 2:
        raise StartupError("averaging needs two checkpoints or more")
    _require_new_directory(out)
    metas = [read_checkpoint_config(source) for source in sources]
    tokenizers = [
        source / m["tokenizer"] if m.get("tokenizer") else None
        for source, m in zip(sources, metas, strict=True)
    ]
    vocabularies = [t.read_bytes() if t else None for t in tokenizers]
    for source, meta, vocabulary in zip(sources[1:], metas[1:], vocabularies[1:], strict=True):
        if _network_config(meta) != _network_config(metas[0]):
            raise StartupError(f"{source} has another model config than {sources[0]}")
        if vocabulary != vocabularies[0]:
            raise StartupError(f"{source} has another tokenizer than {sources[0]}")
    states = [_read_weights(source / WEIGHTS) for source in sources]
    state = states[0]
    shapes = {k: v.shape for k, v in state.items()}
    for source, other in zip(sources[1:], states[1:], strict=True):
        if {k: v.shape for k, v in other.items()} != shapes:
            raise StartupError(f"{source}'s weights differ from {sources[0]}'s in names or shapes")
    for name, tensor in state.items():
        if tensor.is_floating_point():
            total = torch.stack([s[name].float() for s in states]).sum(0)
            state[name] = (total / len(states)).to(tensor.dtype)
    meta = dict(metas[0])
    meta["averaged_from"] = [str(source) for source in sources]
    if meta.get("version"):  # other weights, so another version (service.state.model_version)
        meta["version"] = f"{meta['version']}-avg{len(sources)}"
    return _write_copy(state, meta, tokenizers[0], out)


def _network_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The model config without its training and decoding fields: checkpoints trained with
    other loss weights, or tuned apart (`mad tune`), still hold weights of one network."""
    return {k: v for k, v in meta["model"].items() if k not in TRAINING_AND_DECODING_FIELDS}


def is_new_or_empty(out: Path) -> bool:
    """Whether a checkpoint copy may be written to `out`: it does not exist or is an empty
    directory."""
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def _require_new_directory(out: Path) -> None:
    if not is_new_or_empty(out):
        raise StartupError(f"{out} already exists: write the copy to a new or empty directory")


def _write_copy(
    state: dict[str, torch.Tensor], meta: dict[str, Any], tokenizer: Path | None, out: Path
) -> Path:
    """Write weights, config and tokenizer to the new directory `out`, whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        staged = Path(scratch) / "checkpoint"
        staged.mkdir()
        save_tensors(state, staged / WEIGHTS, {"format": FORMAT})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staged / tokenizer.name)
        (staged / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        staged.rename(out)
    return out


def checkpoint_digest(directory: str | Path) -> str:
    """sha256 of the weights and config.json: identifies the exact model a result came from,
    its default refinement schedules included (`mad tune` rewrites only config.json, and
    exports cached under this digest carry a copy of it)."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        with open(Path(directory) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
