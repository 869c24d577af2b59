"""Prepared shards: what `datamodules.prepare` writes reads back as the folder reader's samples, streams exactly
once per epoch across ranks and workers, resumes mid-epoch, and restarts an interrupted preparation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import datamodules.prepare as prepare_module
from configs import ConfigError, load_config
from datamodules.cxr_datamodule import CxrDataModule
from datamodules.mimic import MimicCxrDataset, build_mimic_index
from datamodules.mscxr import load_grounding_sample, read_ms_cxr
from datamodules.prepare import prepare
from datamodules.shards import ShardDataset
from datamodules.synthetic import MS_CXR_FILE
from lightning_modules.components import load_tokenizer, model_backbone

SAMPLES_PER_SHARD = 8


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str]) -> DictConfig:
    return load_config([], tiny_overrides)


@pytest.fixture
def shards(tiny_cfg: DictConfig, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    prepare(tiny_cfg, out, samples_per_shard=SAMPLES_PER_SHARD)
    return out


def datamodule_for(cfg: DictConfig, shards: Path, **options) -> CxrDataModule:
    return CxrDataModule(
        None,
        cfg.data.resolution,
        data_format="shards",
        shards=shards,
        shard_cache_dir=Path(cfg.data.cache_dir) / "shards",
        **options,
    )


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_shards_hold_exactly_the_folder_readers_samples(tiny_cfg, shards):
    tokenizer = load_tokenizer(tiny_cfg.model, model_backbone(tiny_cfg.model))
    for split in ("train", "validate"):
        index = build_mimic_index(tiny_cfg.data.root, split=split, tokenizer=tokenizer)
        folder = MimicCxrDataset(index, tiny_cfg.data.resolution)
        prepared = ShardDataset(shards, split, Path(tiny_cfg.data.cache_dir) / "shards")
        assert len(prepared) == len(folder) > 0
        assert prepared.shard_sizes[0] == min(SAMPLES_PER_SHARD, len(folder))
        for item in range(len(folder)):
            expected, got = folder[item], prepared[item]
            assert got["dicom_id"] == expected["dicom_id"]
            assert got["caption"] == expected["caption"]
            assert torch.equal(got["pixel_values"], expected["pixel_values"])  # bit-exact after decoding
            assert torch.equal(got["labels"].isnan(), expected["labels"].isnan())
            assert torch.equal(got["labels"].nan_to_num(7.0), expected["labels"].nan_to_num(7.0))


def epoch_batches(datamodule: CxrDataModule, rank: int, epoch: int, world_size: int = 2) -> list[dict]:
    loader = datamodule.train_loader(world_size, rank)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def counted_ids(batches: list[dict]) -> list[str]:
    return [i for batch in batches for i, w in zip(batch["dicom_id"], batch["loss_weight"], strict=True) if w > 0]


def test_two_ranks_with_two_workers_see_every_sample_once_per_epoch(tiny_overrides, tmp_path):
    cfg = load_config([], [*tiny_overrides, "data.views=[PA]"])
    shards = tmp_path / "pa-shards"
    prepare(cfg, shards, samples_per_shard=SAMPLES_PER_SHARD)
    datamodule = datamodule_for(cfg, shards, batch_size=4, num_workers=2, seed=5)
    total = len(datamodule.split_dataset("train"))
    assert total % 2, "the check needs a count that two ranks cannot split evenly"
    orders = []
    for epoch in (0, 1):
        per_rank = [epoch_batches(datamodule, rank, epoch) for rank in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1])  # DDP: every process takes the same number of steps
        seen = counted_ids(per_rank[0]) + counted_ids(per_rank[1])
        assert len(seen) == len(set(seen)) == total
        orders.append(seen)
    assert orders[0] != orders[1]
    again = datamodule_for(cfg, shards, batch_size=4, num_workers=2, seed=5)
    assert counted_ids(epoch_batches(again, 0, 1)) + counted_ids(epoch_batches(again, 1, 1)) == orders[1]


def test_a_loader_restored_mid_epoch_continues_with_the_same_batches(tiny_cfg, shards):
    def loader():
        return datamodule_for(tiny_cfg, shards, batch_size=3, num_workers=2, seed=1).train_loader(1, 0)

    uninterrupted = [batch["dicom_id"] for batch in loader()]
    interrupted = loader()
    iterator = iter(interrupted)
    first = [next(iterator)["dicom_id"] for _ in range(4)]
    state = interrupted.state_dict()
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    assert first + [batch["dicom_id"] for batch in resumed] == uninterrupted


def test_an_interrupted_preparation_finishes_to_identical_shards(
    tiny_cfg, tiny_overrides, shards, tmp_path, monkeypatch
):
    out = tmp_path / "interrupted"
    real_write_shard = prepare_module.write_shard
    written = []

    def write_then_crash(path: Path, records) -> None:
        if len(written) == 2:
            path.with_name(path.name + ".partial").write_bytes(b"half a tar")
            raise KeyboardInterrupt
        real_write_shard(path, records)
        written.append(path)

    monkeypatch.setattr(prepare_module, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_cfg, out, samples_per_shard=SAMPLES_PER_SHARD)
    monkeypatch.undo()
    finished = {path: path.stat().st_mtime_ns for path in written}
    prepare(tiny_cfg, out, samples_per_shard=SAMPLES_PER_SHARD)
    digests = file_digests(out)
    assert digests == {name: d for name, d in file_digests(shards).items() if not name.endswith(".partial")}
    assert {path: path.stat().st_mtime_ns for path in written} == finished  # finished shards were not rewritten
    with pytest.raises(ConfigError, match="resolution"):
        prepare(load_config([], [*tiny_overrides, "data.resolution=16"]), out, samples_per_shard=8)


def test_undecodable_images_are_skipped_and_counted(tiny_overrides, synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    index = build_mimic_index(root, split="train")
    Path(index.samples["image_path"].iloc[3].replace(str(synthetic_root), str(root))).write_bytes(b"not a jpeg")
    cfg = load_config([], [*tiny_overrides, f"data.root={root}"])
    summaries = prepare(cfg, tmp_path / "shards", samples_per_shard=SAMPLES_PER_SHARD)
    assert summaries["train"]["skipped"] == {"undecodable image": 1}
    assert summaries["train"]["samples"] == len(index) - 1
    assert "1 undecodable image" in prepare_module.describe("train", summaries["train"])


def test_wrong_resolution_and_missing_shards_are_refused_clearly(tiny_cfg, shards, tmp_path):
    with pytest.raises(ValueError, match="prepared at resolution 32, but data.resolution is 64"):
        CxrDataModule(None, 64, data_format="shards", shards=shards, shard_cache_dir=tmp_path).setup()
    with pytest.raises(FileNotFoundError, match="datamodules.prepare"):
        ShardDataset(tmp_path / "nowhere", "train", tmp_path)
    (shards / "validate" / "index.json").write_text('{"shardlist": [')
    with pytest.raises(ValueError, match=r"validate/index.json is not a valid shard index"):
        ShardDataset(shards, "validate", tmp_path)


def test_the_command_line_prepares_in_parallel_to_the_same_bytes(tiny_overrides, shards, tmp_path, capsys):
    out = tmp_path / "parallel"
    prepare_module.main(
        ["--out", str(out), "--workers", "2", "--samples-per-shard", str(SAMPLES_PER_SHARD), *tiny_overrides]
    )
    printed = capsys.readouterr().out
    assert "train: 34 samples (no latents); skipped: none" in printed
    assert f"data.format=shards data.shards={out}" in printed
    assert file_digests(out) == file_digests(shards)
    with pytest.raises(SystemExit, match="config error: unknown config key 'data.resolutoin'"):
        prepare_module.main(["--out", str(out), *tiny_overrides, "data.resolutoin=16"])


def test_shards_stream_from_a_url_into_the_cache(tiny_cfg, shards, tmp_path):
    """An object-store-style URL (here HTTP on localhost): shards are downloaded once into the cache, then read."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = ShardDataset(url, "train", tmp_path / "remote-cache")
        local = ShardDataset(shards, "train", Path(tiny_cfg.data.cache_dir) / "shards")
        assert len(remote) == len(local)
        for item in (0, len(local) - 1):
            assert torch.equal(remote[item]["pixel_values"], local[item]["pixel_values"])
            assert remote[item]["caption"] == local[item]["caption"]
        server.shutdown()
    downloaded = sorted(path.name for path in (tmp_path / "remote-cache").rglob("*.tar"))
    assert downloaded == ["shard-000000.tar", "shard-000004.tar"]
    assert not any(path.is_symlink() for path in (tmp_path / "remote-cache").rglob("*.tar"))


def test_ms_cxr_grounding_images_match_the_prepared_images(tiny_overrides, synthetic_root, tmp_path):
    """Grounding reads the raw MS-CXR CSV and JPGs through the same transform that wrote the shards."""
    cfg = load_config([], [*tiny_overrides, "data.splits.val=test"])
    prepare(cfg, tmp_path / "shards", samples_per_shard=SAMPLES_PER_SHARD)
    prepared = {}
    for split in ("train", "test"):
        dataset = ShardDataset(tmp_path / "shards", split, tmp_path / "cache")
        prepared |= {sample["dicom_id"]: sample for sample in (dataset[i] for i in range(len(dataset)))}
    items = [i for i in read_ms_cxr(synthetic_root / MS_CXR_FILE) if i.dicom_id in prepared]
    assert items
    for item in items:
        grounding = load_grounding_sample(item, synthetic_root, cfg.data.resolution)
        assert torch.equal(grounding["pixel_values"], prepared[item.dicom_id]["pixel_values"])


def test_damaged_records_and_a_truncated_shard_are_skipped_and_counted(tiny_cfg, shards):
    damaged = shards / "train" / "shard-000000.tar"
    content = bytearray(damaged.read_bytes())
    start = content.find(b"IDAT")  # the first record's PNG pixel data
    content[start + 10 : start + 60] = b"x" * 50
    damaged.write_bytes(bytes(content))
    truncated = shards / "train" / "shard-000004.tar"  # the last shard: 34 = 4 x 8 + 2 samples
    truncated.write_bytes(truncated.read_bytes()[:1024])
    datamodule = datamodule_for(tiny_cfg, shards, batch_size=4)
    batches = list(datamodule.train_loader(1, 0))
    assert sum(batch["num_skipped"] for batch in batches) == 3  # 1 damaged + the truncated shard's 2
    assert len(counted_ids(batches)) == 34 - 3
