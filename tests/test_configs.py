"""Every YAML in configs/ fills its dataclass (catches typos) and opens with the command that runs it, that very
file; a model built from a config names only fields its transformers config has; the Accelerate files say what
they are for."""

from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from align.calibrate import CalibrateConfig
from align.config import TrainConfig
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
    assert f"configs/{path.relative_to(path.parents[1] if path.parent.name == 'accelerate' else path.parent).as_posix()}" \
        in " ".join(header) or path.name in " ".join(header), f"{path.name}: its command must name this file"
    cls = _kind(path)
    if cls is not None:
        cfg = load_config(cls, path)
        spec = getattr(cfg, "model_config", None)
        if spec:  # trained from a config: every field must be one the model type knows (a typo would be ignored)
            spec = dict(spec)
            defaults = AutoConfig.for_model(spec.pop("model_type")).to_dict()
            unknown = sorted(k for k in spec if k not in defaults)
            assert not unknown, f"{path.name}: model_config fields its model type does not have: {unknown}"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "accelerate"], ids=lambda p: p.name)
def test_accelerate_configs(path):
    """Each Accelerate file is complete and says what it sets up: DeepSpeed files their ZeRO stage by name."""
    cfg = yaml.safe_load(path.read_text())
    assert {"compute_environment", "distributed_type", "num_processes", "mixed_precision"} <= set(cfg), path.name
    if path.stem.startswith("zero"):
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert cfg["deepspeed_config"]["zero_stage"] == int(path.stem.removeprefix("zero")), path.name
    elif path.stem == "ddp":
        assert cfg["distributed_type"] == "MULTI_GPU"
