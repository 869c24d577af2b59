"""The stage time line: Lightning's profiler actions added up by part, nested hooks never counted twice."""

import pytest
from lightning.pytorch.profilers import SimpleProfiler

from callbacks.time_report import describe_time, time_by_part


def profiler_with(durations: dict[str, list[float]]) -> SimpleProfiler:
    profiler = SimpleProfiler()
    profiler.recorded_durations.update(durations)
    return profiler


def test_parts_add_up_top_level_actions_and_the_rest_is_other():
    profiler = profiler_with(
        {
            "run_training_batch": [0.3, 0.5],
            "[LightningModule]LatentDiffusionModule.optimizer_step": [0.1, 0.1],  # inside run_training_batch
            "[_TrainingEpochLoop].train_dataloader_next": [0.05, 0.05],
            "[Strategy]SingleDeviceStrategy.validation_step": [0.2],
            "[_EvaluationLoop].val_next": [0.1],
            "[Callback]FIDCallback.on_train_batch_end": [0.0, 4.0],
            "[Callback]FIDCallback.on_train_end": [2.0],
            "[Callback]ModelCheckpoint{'monitor': 'step', 'mode': 'max'}.on_train_batch_end": [1.5],
            "[Callback]FIDCallback.on_save_checkpoint": [0.5],  # inside ModelCheckpoint's hook
            "[Callback]RichProgressBar.on_train_batch_end": [0.01, 0.01],
            "save_checkpoint": [1.4],  # inside ModelCheckpoint's hook
        }
    )
    assert time_by_part(profiler) == pytest.approx(
        {
            "training steps": 0.8,
            "training data": 0.1,
            "validation": 0.3,
            "FIDCallback": 6.0,
            "ModelCheckpoint": 1.5,
            "progress bar": 0.02,
        }
    )
    assert describe_time(profiler, 10.0) == (
        "FIDCallback 6 s, ModelCheckpoint 2 s, training steps 1 s (2 x 0.400 s), validation 0 s, training data 0 s, "
        "progress bar 0 s, other 1 s"
    )
