"""The live trade-off panel: the (step, FID, AUC) rows it logs to W&B, its state across a resume, rank 0 only."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import WandbLogger

import train
from callbacks.tradeoff_panel import PANEL_KEY, TradeoffPanelCallback, fid_key, grounding_auc_key
from tests.collectives import collectives_forbidden
from tests.test_train_script import metric_rows


def logged_tables(wandb_dir: Path) -> list[dict]:
    """Every table the panel logged in the offline run(s) under ``wandb_dir``, fewest rows first."""
    files = wandb_dir.glob("offline-run-*/files/media/table/tradeoff/fid_vs_grounding_auc_table_*.table.json")
    return sorted((json.loads(path.read_text()) for path in files), key=lambda table: len(table["data"]))


def evaluate_at(trainer: SimpleNamespace, panel: TradeoffPanelCallback, step: int, values: dict[str, float]) -> None:
    """What the fidelity and grounding callbacks do at a step (log to every logger), then the panel's hook."""
    trainer.global_step = step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    with collectives_forbidden():
        panel.on_train_batch_end(trainer, None, None, None, 0)


def test_two_evaluations_give_a_two_row_table_and_the_state_round_trips(tmp_path):
    wandb_logger = WandbLogger(save_dir=str(tmp_path), mode="offline", project="tradeoff-panel-test")
    trainer = SimpleNamespace(loggers=[wandb_logger], is_global_zero=True, global_step=0)
    panel = TradeoffPanelCallback()
    panel.setup(trainer, None, "fit")
    evaluate_at(trainer, panel, 1, {"train/loss": 0.5})  # no evaluation at this step: no point
    evaluate_at(trainer, panel, 2, {"fid/domain@32": 30.5, "agreement/domain/auroc_mean": 0.6})
    evaluate_at(trainer, panel, 2, {"grounding/auc": 0.61, "grounding/auc/pneumonia": 0.9})
    evaluate_at(trainer, panel, 3, {"grounding/auc": 0.99})  # grounding alone: no point
    evaluate_at(trainer, panel, 4, {"fid/domain@32": 25.25, "grounding/paper_code/auc": 0.66, "grounding/auc": 0.1})
    panel.on_train_end(trainer, None)  # the end of fit at an evaluated step adds nothing twice
    panel.teardown(trainer, None, "fit")
    assert trainer.loggers == [wandb_logger]
    wandb_logger.experiment.finish()

    assert panel.points == [(2, 30.5, 0.61), (4, 25.25, 0.66)]  # paper_code's AUC wins over the plain key
    tables = logged_tables(tmp_path / "wandb")
    assert [len(table["data"]) for table in tables] == [1, 2]  # the whole trajectory at every evaluation
    assert tables[-1] == {"columns": ["step", "fid", "grounding_auc"], "data": [[2, 30.5, 0.61], [4, 25.25, 0.66]]}
    (history,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    assert PANEL_KEY.encode() in history.read_bytes()

    resumed = TradeoffPanelCallback()
    resumed.load_state_dict(json.loads(json.dumps(panel.state_dict())))  # plain values, as in a checkpoint
    assert resumed.points == panel.points and resumed.axes == ("fid/domain@32", "grounding/paper_code/auc")


def test_other_processes_and_runs_without_wandb_record_nothing():
    without_wandb = SimpleNamespace(loggers=[], is_global_zero=True, global_step=0)
    panel = TradeoffPanelCallback()
    panel.setup(without_wandb, None, "fit")
    assert without_wandb.loggers == []  # nothing to show the panel on: the recorder stays out
    evaluate_at(without_wandb, panel, 2, {"fid/domain@32": 1.0, "grounding/auc": 0.5})
    assert panel.points == []

    other_process = SimpleNamespace(loggers=[], is_global_zero=False, global_step=0)
    panel = TradeoffPanelCallback()
    other_process.loggers.append(panel.recorder)  # even had it seen the values, process 1 draws no point
    evaluate_at(other_process, panel, 2, {"fid/domain@32": 1.0, "grounding/auc": 0.5})
    assert panel.points == []


def test_a_resumed_run_keeps_the_earlier_points_in_its_panel(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("logger.wandb")]
    overrides += [
        "logger.wandb.mode=offline",
        "trainer.max_steps=2",
        "callbacks.grounding.every_n_steps=1",
        "callbacks.grounding.num_items=4",
        "callbacks.fidelity.every_n_steps=1",
        "callbacks.fidelity.num_images=3",  # the validation split's 3 images,
        "callbacks.attention_heatmaps.enabled=false",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.export_pipeline=false",
    ]
    run_dir = train.main(overrides)["run_dir"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (saved,) = [value for key, value in state["callbacks"].items() if key.startswith("TradeoffPanelCallback")]
    rows = metric_rows(run_dir)
    fid_column, auc_column = fid_key(rows[0]), grounding_auc_key(rows[0])
    logged = {(int(r["step"]), key): float(r[key]) for r in rows for key in (fid_column, auc_column) if r[key]}
    expected = [[step, logged[step, fid_column], logged[step, auc_column]] for step in (1, 2)]
    assert saved["points"] == expected

    train.main([*overrides, "trainer.max_steps=3", "resume=last"])
    final = logged_tables(run_dir / "wandb")[-1]["data"]
    assert [row[0] for row in final] == [1, 2, 3] and final[:2] == expected
