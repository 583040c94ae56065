"""train_log.csv: one row per logged training step, rewritten whole (atomically) on each."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from model.checkpoint import write_files


class CsvLog:
    """Append rows to a CSV file; new keys extend the header (the file is rewritten). A
    resumed run keeps the rows up to its step: later ones were logged after its last save."""

    def __init__(self, path: Path, up_to: int = 0):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            with open(path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= up_to]

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_files(self.path.parent, {self.path.name: text.getvalue().encode()})
