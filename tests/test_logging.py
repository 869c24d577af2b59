"""What a run leaves for the dashboards: the W&B offline run and TensorBoard event files, read back from disk."""

import json
import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event

import train
from tests.test_train_script import metric_rows


def tensorboard_events(folder: Path) -> list[Event]:
    """Decode TFRecord-framed event files (length, crc, payload, crc) without TensorBoard itself."""
    events = []
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_wandb_and_tensorboard_receive_config_scalars_images_and_the_grounding_table(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("logger.wandb")]
    outputs = train.main([*overrides, "logger.wandb.mode=offline", "logger.tensorboard=true"])
    run_dir = outputs["run_dir"]

    # wandb writes an offline run's history and config into its binary .wandb log (keys appear verbatim in it),
    # and media (images, tables) as files beside it.
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    (history,) = wandb_run.glob("*.wandb")
    log = history.read_bytes()
    for key in (
        "train/loss",
        "val/loss",
        "grounding/paper_code/iou",
        "grounding/paper_code/auc",
        "grounding/paper_code/cnr",
        "fid/domain@",
        "ucg_probability",
        "trainable",
    ):
        assert key.encode() in log, key
    files = wandb_run / "files" / "media"
    (table,) = (files / "table" / "grounding").glob("samples_*.table.json")
    rows = json.loads(table.read_text())
    assert {"dicom_id", "phrase", "category", "paper_code/iou", "biovil/miou", "method/cnr"} <= set(rows["columns"])
    grounding_count = {int(float(row["grounding/count"])) for row in metric_rows(run_dir) if row.get("grounding/count")}
    assert {len(rows["data"])} == grounding_count
    media = [p.name for p in (files / "images").rglob("*.png")]
    assert any(name.startswith("samples_") for name in media)
    assert any(name.startswith("heatmaps_") for name in media)

    events = tensorboard_events(run_dir / "tensorboard" / "diffusion")
    scalar_tags = {value.tag for event in events for value in event.summary.value if value.HasField("simple_value")}
    image_tags = {value.tag for event in events for value in event.summary.value if value.HasField("image")}
    assert {"train/loss", "grounding/paper_code/iou"} <= scalar_tags
    assert any(tag.startswith("fid/") for tag in scalar_tags)
    assert "samples" in image_tags and any("heatmaps" in tag for tag in image_tags)
