"""The paper's trade-off, live: one W&B panel of FID against grounding AUC, a point per in-training evaluation.

The fidelity and grounding callbacks log their values to the run's loggers; this callback adds a small recorder
among them that keeps the latest value of the two trade-off keys, and after each step where both were logged it
appends (step, FID, AUC) to its points and logs them as one W&B scatter (``tradeoff/fid_vs_grounding_auc``).
Process 0 only, no collective. Its points are callback state, so a resumed run's panel keeps the earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

# The grounding AUC of the trade-off (its y axis, also study.py's): the first of these keys that was logged. The
# headline convention's key first (grounding.conventions' default order), then the others, then the key from
# before metric conventions were named.
GROUNDING_AUC_KEYS = ("grounding/paper_code/auc", "grounding/method/auc", "grounding/biovil/auc", "grounding/auc")
FID_PREFIX = "fid/"  # x axis: the first fid/<extractor>@M key logged
PANEL_KEY = "tradeoff/fid_vs_grounding_auc"
COLUMNS = ("step", "fid", "grounding_auc")


def grounding_auc_key(keys: Iterable[str]) -> str | None:
    """The trade-off's grounding AUC among ``keys`` (logged metric names or table columns), or None."""
    keys = set(keys)
    return next((key for key in GROUNDING_AUC_KEYS if key in keys), None)


def fid_key(keys: Iterable[str]) -> str | None:
    """The trade-off's FID among ``keys`` (the first ``fid/`` one, in their order), or None."""
    return next((key for key in keys if key.startswith(FID_PREFIX)), None)


class _TradeoffRecorder(Logger):
    """Not a dashboard: the panel's view of what the evaluations logged, the latest (step, value) of each FID and
    grounding AUC key."""

    def __init__(self) -> None:
        super().__init__()
        self.latest: dict[str, tuple[int | None, float]] = {}

    @property
    def name(self) -> str:
        return "tradeoff_panel"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key in GROUNDING_AUC_KEYS or key.startswith(FID_PREFIX):
                self.latest[key] = (step, float(value))

    def point_at(self, step: int) -> tuple[str, float, str, float] | None:
        """(FID key, FID, AUC key, AUC) when both were logged at ``step``, else None."""
        logged = [key for key, (at, _) in self.latest.items() if at == step]
        fid, auc = fid_key(logged), grounding_auc_key(logged)
        if fid is None or auc is None:
            return None
        return fid, self.latest[fid][1], auc, self.latest[auc][1]


class TradeoffPanelCallback(L.Callback):
    """Put after the fidelity and grounding callbacks (hooks run in list order): at the end of each training step
    and of fit it reads what they logged at that step. Does nothing without a W&B logger."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []
        self.axes: tuple[str, str] | None = None  # (FID key, AUC key) of the points, for the panel's title
        self.recorder = _TradeoffRecorder()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wandb = any(isinstance(logger, WandbLogger) for logger in trainer.loggers)
        if stage == "fit" and trainer.is_global_zero and wandb and self.recorder not in trainer.loggers:
            trainer.loggers = [*trainer.loggers, self.recorder]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.loggers = [logger for logger in trainer.loggers if logger is not self.recorder]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.add_point(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.add_point(trainer)

    def add_point(self, trainer: L.Trainer) -> None:
        """Append this step's (FID, AUC) if both were logged at it (once per step) and log the panel."""
        step = trainer.global_step
        if not trainer.is_global_zero or (self.points and self.points[-1][0] >= step):
            return
        point = self.recorder.point_at(step)
        if point is None or not all(math.isfinite(value) for value in (point[1], point[3])):
            return
        fid_name, fid, auc_name, auc = point
        self.points.append((step, fid, auc))
        self.axes = (fid_name, auc_name)
        self.log_panel(trainer, step)

    def log_panel(self, trainer: L.Trainer, step: int) -> None:
        import wandb  # only where a W&B logger exists

        table = wandb.Table(columns=list(COLUMNS), data=[list(point) for point in self.points])
        title = f"{self.axes[0]} (x) vs {self.axes[1]} (y), one point per evaluation step"
        panel = wandb.plot.scatter(table, "fid", "grounding_auc", title=title)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_metrics({PANEL_KEY: panel}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(point) for point in self.points], "axes": list(self.axes or [])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [(int(step), float(fid), float(auc)) for step, fid, auc in state_dict["points"]]
        self.axes = tuple(state_dict["axes"]) or None
