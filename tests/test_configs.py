"""Every YAML in configs/ fills its dataclass (catches typos) and opens with the command that runs it."""

from pathlib import Path

import pytest

from align.calibrate import CalibrateConfig
from align.train import TrainConfig
from data.config import load_config
from decode.eval_config import EvalConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def _kind(path: Path):
    if path.parent.name == "accelerate":
        return None
    if path.stem.endswith("_eval"):
        return EvalConfig
    if path.stem.endswith("_calibrate"):
        return CalibrateConfig
    return TrainConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_documents_its_command(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} must open with a comment giving its launch command"
    assert any(word in " ".join(header) for word in ("accelerate launch", "python -m")), path.name
    cls = _kind(path)
    if cls is not None:
        load_config(cls, path)
