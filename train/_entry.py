"""Shared Hydra plumbing of the train/ entry points: resolve the config to a plain dict and run one recipe."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "configs")


def run(recipe: Callable[[dict[str, Any]], Any], config_name: str = "train") -> Callable[[], None]:
    """A Hydra main (config `configs/<config_name>.yaml`) that calls `recipe(resolved config dict)` and prints its
    result."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def main(cfg: DictConfig) -> None:
        logging.getLogger("csm_jax").setLevel(logging.INFO)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
        result = recipe(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        if isinstance(result, dict):
            print(json.dumps(result, default=str), flush=True)  # one line, last: easy to parse

    return main
