import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import train
from callbacks.grounding import GroundingCallback, gather_rows
from configs import load_config
from datamodules.mscxr import read_ms_cxr
from grounding.evaluation import interleave_categories
from grounding.phrase_grounding import HeatmapSettings
from lightning_modules.loading import load_diffusion_module

TINY_MODEL_OVERRIDES = ["model.text_encoder.max_length=16", "model.text_encoder.use_attention_mask=false"]
FAST_GROUNDING = [
    f"callbacks.{block}.{key}={value}"
    for block in ("grounding", "attention_heatmaps")
    for key, value in (("every_n_steps", 2), ("num_inference_steps", 3), ("last_k_steps", 2))
]
NO_EVALUATION_CALLBACKS = [
    f"callbacks.{block}.enabled=false" for block in ("grounding", "attention_heatmaps", "fidelity")
]
METRIC_KEYS = [
    *(f"paper_code/{name}" for name in ("iou", "miou", "auc", "cnr", "pointing")),
    *(f"biovil/{name}" for name in ("miou", "auc", "cnr")),
    *(f"method/{name}" for name in ("iou", "miou", "auc", "cnr", "pointing", "iou@0.3", "iou@0.5")),
]


def test_callbacks_log_grounding_metrics_and_heatmap_grids_during_fit(tiny_overrides, synthetic_root):
    outputs = train.main(
        [
            *tiny_overrides,
            *FAST_GROUNDING,
            "callbacks.fidelity.enabled=false",
            "callbacks.attention_heatmaps.num_items=3",
        ]
    )
    metrics = pd.read_csv(outputs["metrics"])
    logged = metrics.dropna(subset=["grounding/paper_code/iou"])
    assert logged["step"].tolist() == [2, 3]  # every 2 steps and at the end of fit (max_steps=3)
    val_items = read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "val")  # never test: no leakage
    assert (logged["grounding/count"] == len(val_items)).all()
    for key in METRIC_KEYS:
        assert logged[f"grounding/{key}"].notna().all(), key
        assert logged[f"grounding/{key}/macro"].notna().all(), key
        for category in {item.category for item in val_items}:
            assert f"grounding/{key}/{category}" in metrics.columns
    for key in METRIC_KEYS:
        if not key.endswith("/cnr"):
            assert logged[f"grounding/{key}"].between(0, 1).all(), key

    grids = sorted((outputs["run_dir"] / "images").glob("grounding_heatmaps_step*.png"))
    assert [path.name for path in grids] == ["grounding_heatmaps_step000002.png", "grounding_heatmaps_step000003.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.size[0] == 4 * 128  # 2 pairs per row: X-ray, overlay
        assert grid.size[1] == math.ceil(2 * 3 / 4) * (128 + 30)  # 3 panel items, labelled tiles


def test_grounding_callbacks_can_be_turned_off(tiny_overrides):
    cfg = load_config([], [*tiny_overrides, *NO_EVALUATION_CALLBACKS])
    callbacks = train.evaluation_callbacks(cfg, Path(cfg.data.root), Path(cfg.run_dir))
    assert not any(
        type(callback).__name__ in {"GroundingCallback", "AttentionHeatmapCallback"} for callback in callbacks
    )


def test_missing_ms_cxr_csv_is_named_with_the_config_key(tiny_overrides, tmp_path):
    cfg = load_config(
        [], [*tiny_overrides, "callbacks.fidelity.enabled=false", f"data.ms_cxr_csv={tmp_path / 'absent.csv'}"]
    )
    with pytest.raises(FileNotFoundError, match=r"absent\.csv.*data\.ms_cxr_csv"):
        train.evaluation_callbacks(cfg, Path(cfg.data.root), tmp_path)


def test_panel_takes_one_category_after_another(synthetic_root):
    items = read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv")
    panel = interleave_categories(items, 4)
    categories_in_order = list(dict.fromkeys(item.category for item in items))
    assert [item.category for item in panel] == categories_in_order[:4]
    assert sorted(map(id, interleave_categories(items))) == sorted(map(id, items))


def _callback(data_root: Path) -> GroundingCallback:
    items = read_ms_cxr(data_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "val")
    return GroundingCallback(items, data_root, 32, HeatmapSettings(3, 2), batch_size=2)


def _evaluate_shard(rank: int, port: int, module, data_root: Path, results) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values, rows = _callback(data_root).evaluate(SimpleNamespace(global_rank=rank, world_size=2), module)
        results.put((rank, (values, [row["dicom_id"] for row in gather_rows(rows)])))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def unused_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_each_process_scores_its_shard_and_the_metrics_sync(tiny_model_dir, synthetic_root, unused_tcp_port):
    module, _ = load_diffusion_module(tiny_model_dir, TINY_MODEL_OVERRIDES)
    single, single_rows = _callback(synthetic_root).evaluate(SimpleNamespace(global_rank=0, world_size=1), module)
    results = mp.get_context("fork").SimpleQueue()
    # forked processes share the loaded model instead of importing and loading everything again
    mp.start_processes(
        _evaluate_shard, args=(unused_tcp_port, module, synthetic_root, results), nprocs=2, start_method="fork"
    )
    per_rank = dict(results.get() for _ in range(2))
    assert single["grounding/count"] == 5  # the synthetic val split; shards of 3 and 2 pairs
    for rank in (0, 1):
        values, gathered_ids = per_rank[rank]
        assert values.keys() == single.keys()
        for key, value in single.items():
            assert values[key] == pytest.approx(value, abs=1e-5, nan_ok=True), key
        assert sorted(gathered_ids) == sorted(row["dicom_id"] for row in single_rows)  # every row on every process


def test_in_training_grounding_watches_val_and_evaluate_defaults_to_test(tiny_overrides, synthetic_root):
    cfg = load_config([], tiny_overrides)
    callback = GroundingCallback.from_config(cfg, synthetic_root)
    csv = synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv"
    pairs = {split: {(i.dicom_id, i.phrase) for i in read_ms_cxr(csv, split)} for split in ("val", "test")}
    watched = {(item.dicom_id, item.phrase) for item in callback.items}
    assert watched and watched <= pairs["val"] and not watched & pairs["test"]
    assert cfg.grounding.split == "test"  # evaluate.py's default: the held-out pairs published numbers use


def test_an_unknown_convention_fails_when_the_callbacks_are_built_naming_the_key(tiny_overrides, synthetic_root):
    cfg = load_config([], [*tiny_overrides, "grounding.conventions=[paper_code,bioViL]"])
    with pytest.raises(ValueError, match=r"grounding.conventions: unknown \['bioViL'\]; known: paper_code, biovil"):
        GroundingCallback.from_config(cfg, synthetic_root)
