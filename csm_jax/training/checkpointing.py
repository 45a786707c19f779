"""Training checkpoints: orbax CheckpointManager holding the TrainState and a JSON item (data loader state,
metrics, configs) per step.

Kept: the `max_to_keep` latest checkpoints (for resuming) plus the `keep_best` ones with the lowest `best_metric`
(checkpoints saved with eval metrics). Saves are asynchronous by default (arrays are copied off the devices before
`save` returns; files are written in the background); `close()` waits for them. Restoring takes an abstract state
whose ShapeDtypeStructs carry shardings, so the state comes back laid out as it was trained.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from csm_jax.training.state import TrainState


class _NoMetricsFilter(logging.Filter):
    """Checkpoints saved between evals have no metrics by design; orbax warns about each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsFilter())


class Checkpointer:
    def __init__(
        self,
        directory: str | Path,
        max_to_keep: int = 3,
        keep_best: int = 1,
        best_metric: str = "eval/loss",
        async_save: bool = True,
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.best_metric = best_metric

        def metric(metrics: dict[str, Any]) -> float:
            value = metrics.get(best_metric) if metrics else None
            return math.inf if value is None else float(value)

        keep: list[Any] = [policies.LatestN(n=max_to_keep)]
        if keep_best > 0:
            keep.append(policies.BestN(get_metric_fn=metric, reverse=True, n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=metric,
            best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None
             ) -> bool:
        """Save `state` and the JSON-serialisable `meta` as `step`; `metrics` (with `best_metric`) rank it for
        keep-best. Returns whether a checkpoint was started."""
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(int(step), args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """(state, meta) of `step` (default: the latest). `abstract_state`: ShapeDtypeStructs with shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(int(step), args=args)
        return restored.state, restored.meta

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON `meta` saved with `step`, without restoring the state."""
        return self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def metrics(self, step: int) -> dict[str, Any] | None:
        return self.manager.metrics(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
