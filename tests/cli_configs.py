"""A config file for ``trustregion`` command tests: the random tiny model of ``conftest``, two
prompts of two completions, no progress bar or summary, everything under one directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_cli_config(directory: Path, model_dir: Path, *, max_new_tokens: int = 2,
                    trainer: dict[str, Any] | None = None, **sections: Any) -> Path:
    """Write ``directory/config.yaml`` and return its path. ``trainer`` settings are added to
    the defaults (one optimiser step, no logger); other keyword arguments become top-level
    sections (``checkpoint``, ``seed_everything``)."""
    config = {
        **sections,
        "trainer": {"max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(directory),
                    **(trainer or {})},
        "model": {"policy": f"config:{model_dir}",
                  "batching": {"group_size": 2, "prompts_per_step": 2},
                  "sampling": {"max_new_tokens": max_new_tokens}},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
