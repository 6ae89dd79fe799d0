"""A tiny Kontext pipeline on disk and a small synthetic edit data set, shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructmole.tiny import save_tiny_kontext
from training.synthetic import all_phrasings, write_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "training" / "configs" / "tiny_demo.yaml"


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``model``: the tiny pipeline folder; ``manifest``: 16 training images × 6 tasks + 2 held-out images."""
    root = tmp_path_factory.mktemp("tiny_kontext")
    model = save_tiny_kontext(root / "model", seed=0, text_length=32, corpus=all_phrasings())
    manifest = write_dataset(root / "data", images=16, holdout_images=2)
    return {"model": model, "manifest": manifest, "root": root}


def run_overrides(tiny: dict[str, Path], output_dir: Path, *extra: str, steps: int = 24, every: int = 6) -> list[str]:
    """Overrides of the tiny demo config for a short run of this data set into ``output_dir``."""
    return [
        f"model.pretrained={tiny['model']}",
        f"data.manifest={tiny['manifest']}",
        f"train.output_dir={output_dir}",
        f"train.max_steps={steps}",
        f"save.every={every}",
        "train.batch_size=8",
        "save.report_rows=12",
        "log.every=2",
        "log.progress=false",
        *extra,
    ]
