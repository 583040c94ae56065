"""Evaluation: each task's codec picks its evaluator (`TaskCodec.evaluator`); the ones the
built-in tasks use are here, with the real metrics: pycocotools COCOeval (bbox, segm,
keypoints) and sacrebleu BLEU-4 against all reference captions, on the COCO caption
evaluator's tokens."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import sacrebleu
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.checkpoint import MAD
from model.codecs import CODECS, TaskEvaluator
from model.config import TASKS
from model.data.coco import load_coco
from model.decoding import Runner
from model.inference_io import Request, Result
from model.pipeline import Pipeline
from model.runner import EagerRunner
from model.startup import StartupError

# What `mad eval` reports for a model with the presets' tasks (a model of the synthetic
# worlds adds caption_sentence_share and caption_BLEU4_x_sentences: CaptionBLEU).
METRICS = tuple(metric for task in TASKS for metric in CODECS[task].metrics)
# COCOeval iou type -> the key of a result entry's value.
COCO_RESULT_KEY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


@dataclass
class GroundTruth:
    """One split of a data set in the COCO 2017 layout, what evaluators compare with: the
    instances file (required) and, read when an evaluator first asks, the others."""

    root: Path
    split: str
    instances: COCO
    image_ids: list[int]  # the images evaluated

    @classmethod
    def load(cls, root: Path, split: str, limit: int | None = None) -> GroundTruth:
        """The first `limit` images (by id) of `root`'s `split`."""
        path = root / "annotations" / f"instances_{split}.json"
        instances = load_coco(path)
        if instances is None:
            raise FileNotFoundError(path)
        ids = sorted(instances.imgs)[:limit]
        if not ids:  # every metric would be a meaningless 0
            raise StartupError(f"{path} lists no images: nothing to evaluate")
        absent = [
            name
            for name in (instances.imgs[i]["file_name"] for i in ids)
            if not (root / split / name).is_file()
        ]
        if absent:  # found now, not an hour into the evaluation
            raise StartupError(
                f"{root / split} lacks {len(absent)} of the {len(ids)} images "
                f"{path.name} lists (first: {absent[0]})"
            )
        return cls(root, split, instances, ids)

    def image(self, image_id: int) -> Image.Image:
        return Image.open(self.root / self.split / self.instances.imgs[image_id]["file_name"])

    @cached_property
    def keypoints(self) -> COCO | None:
        return load_coco(self.root / "annotations" / f"person_keypoints_{self.split}.json")

    @cached_property
    def captions(self) -> dict[int, list[str]]:
        """image id -> its reference captions (none without a captions file)."""
        path = self.root / "annotations" / f"captions_{self.split}.json"
        captions: dict[int, list[str]] = {}
        if path.is_file():
            try:
                for ann in json.loads(path.read_text())["annotations"]:
                    captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                raise StartupError(f"{path} is not a COCO captions file ({problem})") from None
        return captions

    @cached_property
    def category_ids(self) -> list[int]:
        """The COCO category id of each class index (categories in id order)."""
        return sorted(self.instances.getCatIds())


def coco_ap(
    gt: COCO | None, results: list[dict], iou_type: str, image_ids: list[int], count: int = 3
) -> list[float]:
    """The first `count` COCOeval stats (AP, AP50, AP75, then by area for boxes and masks:
    small, medium, large, ...), or zeros when there is nothing to compare."""
    if gt is None or not results:
        return [0.0] * count
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [max(0.0, float(s)) for s in evaluator.stats[:count]]


class CocoAP:
    """COCOeval AP of one per-detection output. `values(result)` gives each detection's COCO
    value (a bbox, an RLE, keypoints) or None; `names` name AP, AP50, AP75 (a prefix of them);
    `scores(result)` what each is ranked by (default: its detection's score)."""

    def __init__(
        self,
        truth: GroundTruth,
        gt: COCO | None,
        iou_type: str,
        values: Callable[[Result], Sequence[Any | None]],
        names: Sequence[str],
        scores: Callable[[Result], Sequence[float]] | None = None,
    ) -> None:
        self.truth, self.gt, self.iou_type = truth, gt, iou_type
        self.values, self.names, self.scores = values, names, scores
        self.entries: list[dict[str, Any]] = []

    @property
    def missing(self) -> str | None:
        if self.gt is not None:
            return None
        return f"{self.truth.root / 'annotations'} has no {self.iou_type} ground truth"

    def add(self, image_id: int, result: Result) -> None:
        dets = result.required_detections()
        scores = dets.scores.tolist() if self.scores is None else self.scores(result)
        for j, value in enumerate(self.values(result)):
            if value is not None:
                self.entries.append(
                    {
                        "image_id": image_id,
                        "score": float(scores[j]),
                        "category_id": self.truth.category_ids[int(dets.labels[j])],
                        COCO_RESULT_KEY[self.iou_type]: value,
                    }
                )

    def summarize(self) -> dict[str, float]:
        stats = coco_ap(self.gt, self.entries, self.iou_type, self.truth.image_ids)
        return dict(zip(self.names, stats, strict=False))


# PTB-style tokens, as Stanford's PTBTokenizer splits a caption: "don't" -> "do n't", "man's"
# -> "man 's"; hyphenated words and numbers like 3.5 or 1,000 stay whole; "..." and "--" are one
# token; any other non-space character is a token of its own.
PTB_TOKEN = re.compile(
    r"""\w+(?=n't\b) | n't\b | '(?:s|re|ve|ll|d|m)\b | \w+(?:[-./,&]\w+)* | \.\.\. | -- | \S""",
    re.VERBOSE,
)
# The tokens the COCO caption evaluator (pycocoevalcap) drops after PTB tokenisation; its
# -LRB-/-RRB-/-LCB-/-RCB- are the brackets, and PTB turns double quotes into `` and ''.
COCO_PUNCTUATION = frozenset(
    ("''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', *"()[]{}")
)


def coco_caption_text(text: str) -> str:
    """A caption as the COCO caption evaluator scores it: lowercased, PTB-tokenised, its
    punctuation tokens dropped, tokens joined by single spaces."""
    tokens = PTB_TOKEN.findall(text.lower())
    return " ".join(token for token in tokens if token not in COCO_PUNCTUATION)


def caption_bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] against every reference of each image, on the COCO caption
    evaluator's tokens (`coco_caption_text`; sacrebleu told not to tokenise again), so the
    figure compares with published COCO caption BLEU-4."""
    if not hypotheses:
        return 0.0
    width = max(len(r) for r in references)
    streams = [
        [coco_caption_text(refs[i] if i < len(refs) else refs[0]) for refs in references]
        for i in range(width)
    ]
    bleu = sacrebleu.metrics.BLEU(tokenize="none", lowercase=True)
    return bleu.corpus_score([coco_caption_text(h) for h in hypotheses], streams).score / 100.0


class CaptionBLEU:
    """Corpus BLEU-4 of the task `task`'s text outputs, on the images that have references.

    With `is_sentence` (a model of a known caption language) it also reports the share of
    outputs that are sentences (`<task>_sentence_share`) and BLEU-4 times that share
    (`<name>_x_sentences`): BLEU-4 alone gives credit to word soup that shares words with
    the references ("a person in is is the the")."""

    def __init__(
        self,
        truth: GroundTruth,
        task: str,
        name: str,
        is_sentence: Callable[[str], bool] | None = None,
    ) -> None:
        self.truth, self.task, self.name = truth, task, name
        self.is_sentence = is_sentence
        self.hypotheses: list[str] = []
        self.references: list[list[str]] = []

    @property
    def missing(self) -> str | None:
        if self.truth.captions:
            return None
        return f"{self.truth.root / 'annotations'} has no captions for {self.truth.split}"

    def add(self, image_id: int, result: Result) -> None:
        text, refs = result.outputs.get(self.task), self.truth.captions.get(image_id)
        if text is not None and refs:
            self.hypotheses.append(text)
            self.references.append(refs)

    def summarize(self) -> dict[str, float]:
        metrics = {self.name: caption_bleu4(self.hypotheses, self.references)}
        if self.is_sentence is not None:
            sentences = sum(1 for h in self.hypotheses if self.is_sentence(h))
            share = sentences / max(1, len(self.hypotheses))
            metrics[f"{self.task}_sentence_share"] = share
            metrics[f"{self.name}_x_sentences"] = metrics[self.name] * share
        return metrics


def evaluate(
    mad: MAD,
    data: Path,
    split: str = "val2017",
    device: str = "cpu",
    refine_steps: dict[str, int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    score_threshold: float = 0.05,
    tasks: tuple[str, ...] | None = None,
    nms_iou: float | None = None,
    runner: Runner[Any] | None = None,
) -> dict[str, float]:
    """Metrics of the asked `tasks` (default: all the model's) on the first `limit` images.
    bbox AP is reported whenever detection runs, i.e. also for the tasks it prompts.
    runner: what runs the graphs (any backend, runtime.backends.create_runner); default the
    eager network on `device`."""
    truth = GroundTruth.load(Path(data), split, limit)
    pipeline = Pipeline(mad, runner or EagerRunner(mad.required_network(), device))
    tasks = mad.tasks_to_run(tuple(tasks or mad.config.tasks))
    evaluators = [mad.codecs[task].evaluator(truth) for task in tasks]
    evaluators = [e for e in evaluators if missing_truth(e) is None]  # unscored_tasks: why
    for start in range(0, len(truth.image_ids), batch_size):
        chunk = truth.image_ids[start : start + batch_size]
        requests = [
            Request(
                truth.image(image_id).convert("RGB"),
                tasks,
                dict(refine_steps or {}),
                score_threshold,
                mad.config.num_slots,
                nms_iou,
            )
            for image_id in chunk
        ]
        for image_id, result in zip(chunk, pipeline(requests), strict=True):
            for evaluator in evaluators:
                evaluator.add(image_id, result)
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics |= evaluator.summarize()
    return metrics


def unscored_tasks(
    mad: MAD, data: Path, split: str, tasks: tuple[str, ...] | None = None
) -> dict[str, str]:
    """{task: why} for the `tasks` (default all) that `data`'s `split` cannot score, having
    none of their ground truth; `evaluate` leaves them out of its metrics."""
    truth = GroundTruth.load(Path(data), split, limit=1)
    return {
        task: why
        for task in tasks or tuple(mad.config.tasks)
        if (why := missing_truth(mad.codecs[task].evaluator(truth))) is not None
    }


def missing_truth(evaluator: TaskEvaluator) -> str | None:
    """Why the evaluator's data set cannot score its task, or None (also for an evaluator
    without the optional `missing`)."""
    why = getattr(evaluator, "missing", None)
    return None if why is None else str(why)


def format_table(metrics: dict[str, float]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in metrics.items()]
    return "\n".join(lines)
