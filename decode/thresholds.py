"""Tuned thresholds beside a small model: `bild_thresholds.json`, written by `python -m decode.tune` and read by
`BiLD.from_pretrained` and `decode.eval` when no thresholds are given. A leaf module: it imports nothing of the
project, so the decoder can read what the tuner wrote without depending on the evaluation CLI."""

from __future__ import annotations

import json
from pathlib import Path

THRESHOLDS_FILE = "bild_thresholds.json"


def load_tuned(small: str) -> dict | None:
    """The tuned point written beside a local small model, or None."""
    path = Path(small) / THRESHOLDS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_tuned(small: str, record: dict) -> Path:
    """Writes `record` beside the small model at `small` (a local folder) in one step (a temporary file, then a
    rename), so an interrupted write never leaves half a file; returns its path."""
    path = Path(small) / THRESHOLDS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path
