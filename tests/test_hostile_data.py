"""Hostile data (issue 12): never kills a finished run, never trains on garbage, and is always counted.

One test per case: undecodable reports, impossible MS-CXR boxes, failing in-training evaluations (one process and
two), decompression bombs and the pixel bound on every decoding path, data roots whose ``files/`` is a link,
skips counted once per sample, a seeded fuzz of the readers, and train.py plus prepare on a damaged copy of the
synthetic set.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import train
from callbacks.data_report import DATA_REPORT_FILE, DataReportCallback
from callbacks.evaluation_failures import FailedOnSomeProcess, agree_on_success, run_keeping_training_alive
from callbacks.fidelity import FIDCallback
from callbacks.periodic import PeriodicCallback
from configs import load_config
from datamodules import prepare
from datamodules.mimic import MimicCxrDataset, build_mimic_index, collate_skipping_bad, report_path
from datamodules.mscxr import load_grounding_sample, read_ms_cxr
from datamodules.shards import ShardDataset
from datamodules.skips import (
    SKIP_BOX_OUTSIDE_IMAGE,
    SKIP_CROPPED_AWAY,
    SKIP_MISSING_IMAGE,
    SKIP_UNDECODABLE_IMAGE,
    SKIP_UNDECODABLE_REPORT,
    SkipLedger,
    SkippedSample,
    describe_skips,
)
from datamodules.synthetic import MS_CXR_FILE
from datamodules.transforms import MAX_DECODED_PIXELS, UnreadableImageError, load_grayscale_image
from metrics.domain_classifier import load_labelled_images
from metrics.fidelity_evaluation import FidelityResult
from tests.test_ddp import REPO, ddp_training_overrides, run_with_timeout
from tests.test_evaluate_grounding import grounding_cli
from tests.test_train_script import metric_rows

MS_CXR_HEADER = "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height,split"


# --------------------------------------------------------------------------------------------- damage helpers
def claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size: what a decompression bomb looks like."""
    sof = jpeg.index(b"\xff\xc0")
    patched = bytearray(jpeg)
    patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched)


def jpeg_bytes(width: int, height: int) -> bytes:
    stream = io.BytesIO()
    Image.fromarray((np.arange(width * height) % 251).astype(np.uint8).reshape(height, width)).save(stream, "JPEG")
    return stream.getvalue()


def train_samples(root: Path) -> pd.DataFrame:
    return build_mimic_index(root, split="train").samples


def damage_reports(root: Path, samples: pd.DataFrame, studies: list[int]) -> None:
    """The first study's report in Latin-1 with an accent, the second in UTF-16 (with and without BOM)."""
    for study, encoding in zip(studies, ("latin-1", "utf-16-le"), strict=False):
        subject = int(samples.loc[samples["study_id"] == study, "subject_id"].iloc[0])
        path = report_path(root, subject, study)
        path.write_bytes(("IMPRESSION: Épanchement pleural " + path.read_text()).encode(encoding))


# --------------------------------------------------------------------------------------------- 1. reports
def test_reports_that_are_not_utf8_are_skipped_and_counted_not_garbled(synthetic_root, tmp_path):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    before = train_samples(root)
    studies = list(dict.fromkeys(before["study_id"]))[:2]
    damage_reports(root, before, studies)
    bom_study = list(dict.fromkeys(before["study_id"]))[2]  # UTF-8 with a byte-order mark is still UTF-8
    subject = int(before.loc[before["study_id"] == bom_study, "subject_id"].iloc[0])
    bom_report = report_path(root, subject, bom_study)
    bom_report.write_bytes(b"\xef\xbb\xbf" + bom_report.read_bytes())

    ascii_study = list(dict.fromkeys(before["study_id"]))[3]  # BOM-less UTF-16 of ASCII text is valid UTF-8 + NULs
    subject = int(before.loc[before["study_id"] == ascii_study, "subject_id"].iloc[0])
    utf16_report = report_path(root, subject, ascii_study)
    utf16_report.write_bytes(utf16_report.read_text().encode("utf-16-le"))
    studies.append(ascii_study)

    index = build_mimic_index(root, split="train")
    damaged = before["study_id"].isin(studies)
    assert index.skipped == {SKIP_UNDECODABLE_REPORT: int(damaged.sum())}
    kept = before[~damaged].reset_index(drop=True)
    assert index.samples["caption"].tolist() == kept["caption"].tolist()  # the others unchanged, BOM included
    assert not index.samples["caption"].str.contains("\ufffd|\x00|pleural É", regex=True).any()
    assert index.summary().endswith(f"skipped: {damaged.sum()} report not UTF-8 text")


def test_reports_inside_the_zip_are_decoded_strictly_too(synthetic_root, tmp_path):
    import zipfile

    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    before = train_samples(root)
    study = int(before["study_id"].iloc[0])
    damage_reports(root, before, [study])
    with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w") as archive:
        for report in (root / "files").rglob("*.txt"):
            archive.write(report, f"mimic-cxr-reports/{report.relative_to(root).as_posix()}")
    index = build_mimic_index(root, reports_root=tmp_path / "mimic-cxr-reports.zip", split="train")
    assert index.skipped == {SKIP_UNDECODABLE_REPORT: int((before["study_id"] == study).sum())}


# --------------------------------------------------------------------------------------------- 2. boxes
def write_ms_cxr(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([MS_CXR_HEADER, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    "box", ["-1,5,10,10", "5,-2,10,10", "40,5,10,10", "5,50,10,10"], ids=["x<0", "y<0", "x+w>W", "y+h>H"]
)
def test_a_box_outside_its_image_is_an_error_naming_the_line_or_skipped_and_counted(tmp_path, box):
    good = "a,Edema,Mild edema,files/p10/p10000001/s50000001/a.jpg,5,5,10,10,48,56,test"
    bad = f"b,Edema,Edema at the base,files/p10/p10000001/s50000001/b.jpg,{box},48,56,test"
    csv_path = write_ms_cxr(tmp_path / "ms.csv", [good, good.replace("Mild edema", "Other"), bad])
    with pytest.raises(ValueError, match=r"ms.csv line 4: box .* is not inside its 48 x 56 image"):
        read_ms_cxr(csv_path)
    skipped = SkipLedger()
    items = read_ms_cxr(csv_path, invalid_boxes="skip", skipped=skipped)
    assert [item.phrase for item in items] == ["Mild edema", "Other"]
    assert list(skipped) == [SkippedSample("ms.csv line 4: b", SKIP_BOX_OUTSIDE_IMAGE)]
    with pytest.raises(ValueError, match="invalid_boxes"):
        read_ms_cxr(csv_path, invalid_boxes="clip")


def test_cropped_away_is_reported_only_for_what_the_transform_crops(tiny_model_dir, synthetic_root, tmp_path):
    """evaluate.py grounding: a missing image, a box outside its image and a box in the cropped margin each
    get their own reason; only the last is 'cropped away'."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    table = pd.read_csv(root / MS_CXR_FILE, dtype=str)
    rows = table[(table["split"] == "train") & (table["image_height"].astype(int) >= 52)].drop_duplicates("dicom_id")
    first, second, third = (rows.iloc[i] for i in range(3))
    (root / first["path"]).unlink()  # unreadable: missing
    lines = [
        ",".join(map(str, first.to_list())),
        ",".join(map(str, [*second.to_list()[:4], 10, 0, 5, 1, *second.to_list()[8:]])),  # the top margin: cropped
        ",".join(map(str, [*third.to_list()[:4], 40, 10, 20, 5, *third.to_list()[8:]])),  # outside: 40 + 20 > 48
        ",".join(map(str, rows.iloc[3].to_list())),  # a good one
    ]
    csv_path = write_ms_cxr(tmp_path / "ms.csv", lines)
    with pytest.raises(ValueError, match="ms.csv line 4"):
        grounding_cli(tiny_model_dir, root, tmp_path / "error", "--ms-cxr", str(csv_path))
    summary = grounding_cli(
        tiny_model_dir, root, tmp_path / "skip", "--ms-cxr", str(csv_path), "grounding.invalid_boxes=skip"
    )
    assert summary["count"] == 1, summary
    assert summary["skipped"] == {SKIP_BOX_OUTSIDE_IMAGE: 1, SKIP_CROPPED_AWAY: 1, SKIP_MISSING_IMAGE: 1}
    ids = {sample_id: reason for sample_id, reason in summary["skipped_ids"]}
    assert ids[f"{first['dicom_id']} / {first['label_text']!r}"] == SKIP_MISSING_IMAGE
    assert ids[f"{second['dicom_id']} / {second['label_text']!r}"] == SKIP_CROPPED_AWAY
    assert ids[f"ms.csv line 4: {third['dicom_id']}"] == SKIP_BOX_OUTSIDE_IMAGE


# --------------------------------------------------------------------------------------------- 3. evaluations
def test_a_failing_in_training_evaluation_is_logged_and_the_run_still_exports(
    tiny_overrides, tmp_path, monkeypatch, caplog
):
    def explode(*args, **kwargs):
        raise RuntimeError("grounding exploded on purpose")

    monkeypatch.setattr("callbacks.grounding.evaluate_grounding", explode)
    overrides = [
        *tiny_overrides,
        "callbacks.attention_heatmaps.enabled=false",
        "callbacks.fidelity.enabled=false",
        "callbacks.grounding.every_n_steps=2",  # fails mid-training and again at the end of fit
        "callbacks.sample_grid.every_n_steps=0",
    ]
    with caplog.at_level(logging.ERROR, logger="cxr_diffusion.evaluation"):
        outputs = train.main(overrides)
    assert outputs["checkpoint"].is_file()
    assert json.loads((outputs["pipeline"] / "model_index.json").read_text())["_class_name"]
    failures = [record.getMessage() for record in caplog.records if record.name == "cxr_diffusion.evaluation"]
    assert len(failures) == 2  # step 2 and the end of fit (step 3)
    assert all("GroundingCallback FAILED" in message for message in failures)
    assert all("grounding exploded on purpose" in message for message in failures)


class _FailsOnRankOne(PeriodicCallback):
    """A collective evaluation: local work (fails on rank 1), then a sync every process must reach."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=0)
        self.synced: float | None = None

    def run(self, trainer, module) -> None:
        error = RuntimeError("rank one's shard is broken") if trainer.global_rank == 1 else None
        agree_on_success(error, "cpu")
        total = torch.ones(1)
        dist.all_reduce(total)
        self.synced = float(total)


class _SyncedMetrics:
    """FidelityMetrics' part in FIDCallback.run: a compute() that every process must reach."""

    synced: float | None = None

    def compute(self) -> dict[str, float]:
        total = torch.ones(1)
        dist.all_reduce(total)
        self.synced = float(total)
        return {"fid/stub@2": self.synced}


def _fid_callback_failing_on_rank_one(rank: int) -> FIDCallback:
    """The real FIDCallback.run around an evaluation whose local generation fails on rank 1."""

    def update_share(module, metrics, rank, world_size):
        if rank == 1:
            raise RuntimeError("rank one's generation is broken")
        return FidelityResult({}, None, [])

    callback = FIDCallback(SimpleNamespace(update_share=update_share), every_n_steps=0)
    callback.metrics = _SyncedMetrics()
    return callback


def _evaluate_on_two_processes(rank: int, port: int, kind: str, results) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        callback = _FailsOnRankOne() if kind == "synthetic" else _fid_callback_failing_on_rank_one(rank)
        trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=7, is_global_zero=rank == 0, loggers=[])
        module = SimpleNamespace(device=torch.device("cpu"))
        run_keeping_training_alive(callback, trainer, module)  # must return on both, not hang in all_reduce
        after = torch.full((1,), float(rank))
        dist.all_reduce(after)  # both processes are still in step with each other
        synced = callback.synced if kind == "synthetic" else callback.metrics.synced
        results.put((rank, synced, float(after)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["synthetic", "fid"])
def test_a_failure_on_one_process_of_a_collective_evaluation_hangs_no_one(kind):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("fork")  # no re-import of the test module: seconds, not a minute
    results = context.SimpleQueue()
    processes = [context.Process(target=_evaluate_on_two_processes, args=(r, port, kind, results)) for r in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=90)
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
    assert not hung, "a process hung in the evaluation's collective"
    assert [process.exitcode for process in processes] == [0, 0], "an evaluation failure ended a process"
    assert sorted(results.get() for _ in range(2)) == [(0, None, 1.0), (1, None, 1.0)]  # skipped on both, in step


def test_an_unagreed_failure_of_a_collective_evaluation_is_not_swallowed_on_several_processes():
    class Fails(PeriodicCallback):
        def run(self, trainer, module):
            raise RuntimeError("before any agreement")

    trainer = SimpleNamespace(global_rank=0, world_size=2, global_step=1)
    with pytest.raises(RuntimeError, match="before any agreement"):
        run_keeping_training_alive(Fails(0), trainer, None)
    Fails.collective = False  # a one-process evaluation (rank 0 only) is always caught
    run_keeping_training_alive(Fails(0), trainer, None)
    with pytest.raises(FailedOnSomeProcess):
        agree_on_success(RuntimeError("x"), "cpu")


# --------------------------------------------------------------------------------------------- 4. decoding
def test_decompression_bombs_and_oversized_headers_are_unreadable_and_real_sizes_pass(tmp_path):
    small = jpeg_bytes(64, 64)
    bomb = claim_size(small, 60_000, 60_000)
    with pytest.raises(Image.DecompressionBombError):  # PIL's own error, which is no OSError
        Image.open(io.BytesIO(bomb))
    assert not issubclass(Image.DecompressionBombError, OSError)
    over_bound = claim_size(small, 8_000, 8_000)  # 64M pixels: below PIL's bomb limit, above ours
    assert MAX_DECODED_PIXELS < 8_000 * 8_000
    for damaged in (bomb, over_bound, small[: len(small) // 2], b"\xff\xd8garbage"):
        with pytest.raises(UnreadableImageError) as raised:
            load_grayscale_image(io.BytesIO(damaged))
        assert raised.value.reason == SKIP_UNDECODABLE_IMAGE
    with pytest.raises(UnreadableImageError) as raised:
        load_grayscale_image(tmp_path / "absent.jpg")
    assert raised.value.reason == SKIP_MISSING_IMAGE
    for width, height in ((3_000, 3_000), (4_280, 5_000)):  # real MIMIC-CXR-JPG sizes
        assert load_grayscale_image(io.BytesIO(jpeg_bytes(width, height))).size == (width, height)


@pytest.fixture
def bomb_root(synthetic_root, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the synthetic set with a bomb, an over-bound header and a truncated JPEG among its train images."""
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    samples = train_samples(root)
    grounded = set(pd.read_csv(root / MS_CXR_FILE, dtype=str)["dicom_id"])
    samples = samples.sort_values("dicom_id", key=lambda ids: ~ids.isin(grounded), kind="stable")  # MS-CXR first
    paths = [Path(path) for path in samples["image_path"].iloc[:3]]
    paths[0].write_bytes(claim_size(paths[0].read_bytes(), 60_000, 60_000))
    paths[1].write_bytes(claim_size(paths[1].read_bytes(), 8_000, 8_000))
    paths[2].write_bytes(paths[2].read_bytes()[:200])
    return root, samples["dicom_id"].iloc[:3].tolist()


def test_every_decoding_path_counts_bombs_as_unreadable(bomb_root, tiny_overrides, tmp_path):
    root, bad_ids = bomb_root
    index = build_mimic_index(root, split="train")
    dataset = MimicCxrDataset(index, resolution=32)
    batch = collate_skipping_bad([dataset[i] for i in range(len(dataset))])
    assert sorted(batch["skipped"]) == sorted(SkippedSample(dicom_id, SKIP_UNDECODABLE_IMAGE) for dicom_id in bad_ids)

    images, _ = load_labelled_images(index, resolution=32)  # the domain classifier (and fidelity reference) path
    assert len(images) == len(index) - 3

    items = [item for item in read_ms_cxr(root / MS_CXR_FILE) if item.dicom_id in bad_ids]
    assert {item.dicom_id for item in items} == set(bad_ids)
    for item in items:  # MS-CXR
        with pytest.raises(UnreadableImageError):
            load_grounding_sample(item, root, 32)

    cfg = load_config([], [o for o in tiny_overrides if not o.startswith("data.root")] + [f"data.root={root}"])
    metadata = prepare.prepare(cfg, tmp_path / "shards", samples_per_shard=8)
    assert metadata["train"]["skipped"] == {SKIP_UNDECODABLE_IMAGE: 3}
    shards = ShardDataset(tmp_path / "shards", "train", tmp_path / "shard-cache")
    assert len(shards) == len(index) - 3 and all(isinstance(shards[i], dict) for i in range(len(shards)))


# --------------------------------------------------------------------------------------------- 5. links
def test_a_data_root_whose_files_folder_is_a_link_trains_and_grounds(synthetic_root, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for table in synthetic_root.iterdir():
        if table.name != "files":
            shutil.copy(table, root / table.name)
    shutil.copytree(synthetic_root / "files", tmp_path / "other-disk" / "files")
    os.symlink(tmp_path / "other-disk" / "files", root / "files")
    index = build_mimic_index(root, split="train")
    assert len(index) == len(build_mimic_index(synthetic_root, split="train"))
    assert isinstance(MimicCxrDataset(index, 32)[0], dict)
    samples = [load_grounding_sample(item, root, 32) for item in read_ms_cxr(root / MS_CXR_FILE)]
    assert sum(sample is not None for sample in samples) > 0
    escaping = read_ms_cxr(root / MS_CXR_FILE)[0]
    escaping.path = "files/../../other-disk/files/x.jpg"
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_grounding_sample(escaping, root, 32)


# --------------------------------------------------------------------------------------------- 6. counted once
def test_the_skip_ledger_counts_once_per_sample_and_reason_and_survives_a_checkpoint():
    ledger = SkipLedger()
    assert ledger.add([SkippedSample("a", "x"), SkippedSample("a", "x"), SkippedSample("b", "x")]) == [
        SkippedSample("a", "x"),
        SkippedSample("b", "x"),
    ]
    assert ledger.add([("a", "x"), ("a", "y")]) == [SkippedSample("a", "y")]  # a new reason is a new skip
    assert ledger.counts() == {"x": 2, "y": 1} and len(ledger) == 3
    restored = SkipLedger()
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.counts() == ledger.counts()
    assert describe_skips(ledger.counts()) == "2 x, 1 y" and describe_skips({}) == "none"


# train.py with each rank's skip ledger written at the end of training (Lightning relaunches this script for rank 1).
LEDGER_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from lightning_modules.latent_diffusion import LatentDiffusionModule

record = Path(sys.argv[1])

def write_ledger(self):
    (record / f"ledger-rank{{self.global_rank}}.json").write_text(json.dumps(self.skipped_samples.state_dict()))

LatentDiffusionModule.on_train_end = write_ledger
import train
train.main(sys.argv[2:])
"""


def test_every_process_gets_its_own_skip_ledger_back_on_resume(tiny_training_overrides, synthetic_root, tmp_path):
    """Rank 1 meets unreadable images in its first batch, rank 0 in its second; stopped at step 2 and resumed, each
    rank ends with the ledger of the uninterrupted run and data_report.json counts every skip (a checkpoint used to
    hand rank 0's ledger to every rank: rank 1's own skips were lost from its ledger and from the report)."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    overrides = ddp_training_overrides(
        tiny_training_overrides,
        f"data.root={root}",
        "trainer.max_steps=4",  # 5 steps an epoch on 2 processes: the resumed steps never meet the bad images again
        "train.checkpointing_steps=2",
        "trainer.val_check_interval=100",
        "callbacks.export_pipeline=false",
    )
    datamodule = train.build_datamodule(load_config([], overrides), root, batch_size=4)
    batches = {rank: list(datamodule.train_loader(world_size=2, rank=rank)) for rank in (0, 1)}
    corrupt = {1: set(batches[1][0]["dicom_id"][:2]), 0: {batches[0][1]["dicom_id"][0]}}
    for image in root.rglob("*.jpg"):
        if image.stem in corrupt[0] | corrupt[1]:
            image.write_bytes(b"not a JPEG")
    script = tmp_path / "ledger_train.py"
    script.write_text(LEDGER_SCRIPT.format(repo=str(REPO)))

    def ledgers(record: Path) -> dict[int, set[str]]:
        return {rank: {s for s, _ in json.loads((record / f"ledger-rank{rank}.json").read_text())} for rank in (0, 1)}

    (tmp_path / "straight-record").mkdir()
    run_with_timeout([str(script), str(tmp_path / "straight-record"), *overrides], tmp_path / "straight", 300)
    (straight,) = (tmp_path / "straight" / "runs").iterdir()
    assert ledgers(tmp_path / "straight-record") == corrupt

    twin = tmp_path / "twin" / "runs" / "run"
    (twin / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", twin / "config.yaml")
    shutil.copy(straight / "checkpoints" / "step000002.ckpt", twin / "checkpoints" / "stopped.ckpt")
    resume = f"resume={twin / 'checkpoints' / 'stopped.ckpt'}"
    (tmp_path / "resumed-record").mkdir()
    run_with_timeout([str(script), str(tmp_path / "resumed-record"), *overrides, resume], tmp_path / "twin", 300)

    assert ledgers(tmp_path / "resumed-record") == corrupt
    reports = [json.loads((run / DATA_REPORT_FILE).read_text()) for run in (straight, twin)]
    assert reports[1]["training_loader"] == reports[0]["training_loader"]
    assert {sample_id for sample_id, _ in reports[1]["training_loader"]["samples"]} == corrupt[0] | corrupt[1]


def test_a_resume_on_fewer_processes_keeps_the_skips_of_the_ranks_that_no_longer_run(tmp_path):
    callback = DataReportCallback(tmp_path / DATA_REPORT_FILE)
    saved = [SkipLedger([("a", SKIP_MISSING_IMAGE)]), SkipLedger([("b", SKIP_MISSING_IMAGE), ("c", "x")])]
    callback.load_state_dict(json.loads(json.dumps({"skipped_samples_per_rank": [s.state_dict() for s in saved]})))
    module = SimpleNamespace(skipped_samples=SkipLedger())
    callback.on_train_start(SimpleNamespace(global_rank=0, world_size=1), module)  # one process, no collective
    assert list(module.skipped_samples) == [("a", SKIP_MISSING_IMAGE), ("b", SKIP_MISSING_IMAGE), ("c", "x")]
    assert callback.state_dict() == {"skipped_samples_per_rank": [module.skipped_samples.state_dict()]}


# --------------------------------------------------------------------------------------------- 7. fuzz
def bit_flipped(data: bytes, rng: np.random.Generator, flips: int = 8) -> bytes:
    damaged = bytearray(data)
    for position in rng.integers(0, len(data), flips):
        damaged[position] ^= 1 << int(rng.integers(0, 8))
    return bytes(damaged)


def test_fuzzed_readers_never_crash_count_every_bad_item_and_leave_good_ones_unchanged(synthetic_root, tmp_path):
    rng = np.random.default_rng(12)
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    before = train_samples(root)
    reference = MimicCxrDataset(build_mimic_index(synthetic_root, split="train"), 32)
    clean = {reference.dicom_ids[i]: reference[i]["pixel_values"] for i in range(len(reference))}

    # Images: truncated ones must be counted; bit-flipped ones decode (JPEG often survives) or are counted.
    chosen = rng.choice(len(before), size=12, replace=False)
    truncated, flipped = chosen[:6], chosen[6:]
    for position in truncated:
        path = Path(before["image_path"].iloc[position])
        path.write_bytes(path.read_bytes()[: int(rng.integers(1, path.stat().st_size - 1))])
    for position in flipped:
        path = Path(before["image_path"].iloc[position])
        path.write_bytes(bit_flipped(path.read_bytes(), rng))
    # Reports: random bytes in a few studies that none of the damaged images belong to.
    damaged_studies = set(before["study_id"].iloc[chosen])
    other_studies = [s for s in dict.fromkeys(before["study_id"]) if s not in damaged_studies][:3]
    for study in other_studies:
        subject = int(before.loc[before["study_id"] == study, "subject_id"].iloc[0])
        report_path(root, subject, study).write_bytes(bytes(rng.integers(0, 256, 64, dtype=np.uint8)))

    index = build_mimic_index(root, split="train")
    assert index.skipped == {SKIP_UNDECODABLE_REPORT: int(before["study_id"].isin(other_studies).sum())}
    dataset = MimicCxrDataset(index, 32)
    loaded = {dataset.dicom_ids[i]: dataset[i] for i in range(len(dataset))}
    bad_ids = {str(before["dicom_id"].iloc[p]) for p in chosen}
    for dicom_id in {str(before["dicom_id"].iloc[p]) for p in truncated}:
        assert loaded[dicom_id] == SkippedSample(dicom_id, SKIP_UNDECODABLE_IMAGE)
    for dicom_id, sample in loaded.items():
        if dicom_id in bad_ids:
            assert isinstance(sample, SkippedSample) or sample["pixel_values"].shape == (3, 32, 32)
        else:
            assert torch.equal(sample["pixel_values"], clean[dicom_id])  # good items come out unchanged

    # CSVs: random bytes in random cells: a clear error naming the file, or a table read as before elsewhere.
    metadata = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str, keep_default_na=False)
    errors = 0
    for trial in range(20):
        damaged = metadata.copy()
        row, column = int(rng.integers(len(damaged))), str(rng.choice(damaged.columns))
        damaged.loc[row, column] = bytes(rng.integers(0, 256, 6, dtype=np.uint8)).decode("latin-1")
        trial_root = tmp_path / f"csv-{trial}"
        trial_root.mkdir()
        for name in ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz"):
            os.symlink(root / name, trial_root / name)
        os.symlink(root / "files", trial_root / "files")
        raw = damaged.to_csv(index=False).encode("latin-1") if trial % 2 else damaged.to_csv(index=False).encode()
        (trial_root / "mimic-cxr-2.0.0-metadata.csv").write_bytes(raw)
        try:
            fuzzed = build_mimic_index(trial_root, split="train")
        except ValueError as error:
            assert "mimic-cxr-2.0.0-metadata.csv" in str(error)
            errors += 1
            continue
        untouched = fuzzed.samples[fuzzed.samples["dicom_id"] != metadata.loc[row, "dicom_id"]]
        expected = index.samples.set_index("dicom_id").loc[untouched["dicom_id"], "caption"]
        assert untouched["caption"].tolist() == expected.tolist()
    assert errors > 0  # the fuzz did reach the error paths

    # MS-CXR: random boxes, some outside their image; exactly those are counted.
    table = pd.read_csv(root / MS_CXR_FILE, dtype=str)
    x = rng.integers(-20, 60, len(table))
    w = rng.integers(1, 30, len(table))
    table["x"], table["w"] = x, w
    outside = (x < 0) | (x + w > table["image_width"].astype(int))
    table.to_csv(tmp_path / "ms.csv", index=False)
    skipped = SkipLedger()
    items = read_ms_cxr(tmp_path / "ms.csv", invalid_boxes="skip", skipped=skipped)
    assert len(skipped) == int(outside.sum()) > 0
    assert sum(len(item.boxes) for item in items) == int((~outside).sum())
    with pytest.raises(ValueError, match=f"ms.csv line {int(np.flatnonzero(outside)[0]) + 2}: box"):
        read_ms_cxr(tmp_path / "ms.csv")


# --------------------------------------------------------------------------------------------- done when
def test_train_and_prepare_on_a_damaged_copy_finish_export_and_report_the_counts(
    synthetic_root, tiny_overrides, tmp_path, capsys, caplog
):
    root = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    samples = train_samples(root)
    bad_images = samples.iloc[:3]
    paths = [Path(path) for path in bad_images["image_path"]]
    paths[0].write_bytes(claim_size(paths[0].read_bytes(), 60_000, 60_000))  # decompression bomb
    paths[1].write_bytes(paths[1].read_bytes()[:300])  # truncated
    paths[2].write_bytes(b"not a jpeg")
    missing = samples.iloc[3]
    Path(missing["image_path"]).unlink()
    free_studies = [s for s in dict.fromkeys(samples["study_id"]) if s not in set(samples["study_id"].iloc[:4])]
    damage_reports(root, samples, free_studies[:2])
    bad_report_images = int(samples["study_id"].isin(free_studies[:2]).sum())
    ms_cxr = pd.read_csv(root / MS_CXR_FILE, dtype=str)
    val_rows = ms_cxr[ms_cxr["split"] == "val"]  # what the in-training grounding watches
    unreadable_ms_cxr = val_rows.iloc[0]
    (root / unreadable_ms_cxr["path"]).write_bytes(b"\x00" * 10)
    impossible = val_rows.iloc[-1].copy()
    impossible["x"] = "-5"
    pd.concat([ms_cxr, impossible.to_frame().T]).to_csv(root / MS_CXR_FILE, index=False)

    overrides = [o for o in tiny_overrides if not o.startswith("data.root")] + [f"data.root={root}"]
    with caplog.at_level(logging.WARNING):
        outputs = train.main(
            [
                *overrides,
                "data.batch_size=8",
                "trainer.max_steps=10",  # 3 epochs of 4 batches: the 3 bad images are met again and again
                "train.checkpointing_steps=100",
                "callbacks.attention_heatmaps.enabled=false",
                "callbacks.fidelity.enabled=false",
                "callbacks.sample_grid.every_n_steps=0",
                "callbacks.grounding.every_n_steps=0",
                "callbacks.grounding.num_inference_steps=2",
                "callbacks.grounding.last_k_steps=1",
                "grounding.invalid_boxes=skip",
            ]
        )
    assert outputs["checkpoint"].is_file() and (outputs["pipeline"] / "model_index.json").is_file()
    report = json.loads(outputs["data_report"].read_text())
    index_skips = {SKIP_MISSING_IMAGE: 1, SKIP_UNDECODABLE_REPORT: bad_report_images}
    assert report["splits"]["train"]["skipped"] == index_skips
    assert report["training_loader"]["skipped"] == {SKIP_UNDECODABLE_IMAGE: 3}
    assert sorted(sample_id for sample_id, _ in report["training_loader"]["samples"]) == sorted(bad_images["dicom_id"])
    rows = metric_rows(outputs["run_dir"])
    logged = [float(row["data/skipped_samples"]) for row in rows if row.get("data/skipped_samples")]
    assert logged[-1] == 3 and max(logged) == 3  # once per sample, not once per epoch
    assert [float(row["data/skipped/undecodable_image"]) for row in rows if row.get("data/skipped/undecodable_image")][
        -1
    ] == 3
    grounding_skips = [float(row["grounding/skipped_pairs"]) for row in rows if row.get("grounding/skipped_pairs")]
    assert grounding_skips and grounding_skips[-1] == 2  # the unreadable image and the impossible box
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert f"{unreadable_ms_cxr['dicom_id']} / {unreadable_ms_cxr['label_text']!r}: undecodable image" in warnings
    printed = capsys.readouterr().out
    assert f"train: {len(samples) - 1 - bad_report_images} samples; skipped: {describe_skips(index_skips)};" in printed
    assert "training loader skipped: 3 undecodable image" in printed

    prepare.main(["--out", str(tmp_path / "shards"), "--workers", "0", "--samples-per-shard", "8", *overrides])
    printed = capsys.readouterr().out
    prepared = {**index_skips, SKIP_UNDECODABLE_IMAGE: 3}
    kept = len(samples) - 1 - bad_report_images - 3
    assert f"train: {kept} samples (no latents); skipped: {describe_skips(prepared)}; " in printed
    assert "captions truncated to 16 tokens" in printed
