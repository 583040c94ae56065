"""The command line of the reports that look inside a model's scores on a split
(mad.bench.keypoints, mad.bench.masks, mad.bench.thresholds): the same data, checkpoint and
image options, a printed report and, with --json, the report as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Report = dict[str, Any]
# (checkpoint, data, split, images) -> report
Diagnose = Callable[[Path, Path, str, int], Report]


def run_diagnosis(doc: str, diagnose: Diagnose, print_report: Callable[[Report], None]) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = diagnose(args.checkpoint, args.data, args.split, args.images)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
