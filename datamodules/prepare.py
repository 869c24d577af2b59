"""Write a MIMIC-CXR-JPG layout (real, or the embedded synthetic set) as WebDataset shards for streaming training.

    python -m datamodules.prepare --out data/shards                          # the embedded default's data
    python -m datamodules.prepare --out data/shards --latents                # + the frozen VAE's posteriors
    python -m datamodules.prepare --out /scratch/mimic-shards --workers 16 \\
        --config configs/experiment/stable_diffusion_2_base.yaml --config configs/data/mimic_cxr.yaml \\
        model.pretrained=/models/stable-diffusion-2-base data.root=/data/mimic-cxr-jpg/2.1.0 \\
        data.reports_root=/data/mimic-cxr-reports.zip --latents

The same config as training decides what is written (data.root, reports, views, caption section, splits,
resolution; model.* names the tokenizer that cuts captions and the VAE for --latents), through the same
index and image transform as the folder reader. Samples are skipped and counted, never fatal. Re-running
finishes missing shards and leaves finished ones untouched; a different config for the same --out is refused.
Train on the result with ``data.format=shards data.shards=<out>``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import functools
import json
import multiprocessing
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from omegaconf import DictConfig
from tqdm import tqdm

from configs import ConfigError, load_config
from datamodules.cxr_datamodule import dataset_fingerprint, resolve_data_root
from datamodules.mimic import CHEXPERT_LABELS, MimicIndex, build_mimic_index
from datamodules.shards import (
    FORMAT_VERSION,
    INDEX_FILE,
    METADATA_KEY,
    encode_record,
    shard_file_name,
    write_shard,
)
from datamodules.skips import describe_skips
from datamodules.transforms import UnreadableImageError, load_grayscale_image, resize_center_crop, to_model_tensor
from lightning_modules.autoencoder import vae_cache_folder
from lightning_modules.components import (
    load_tokenizer,
    model_backbone,
    pretrained_vae_folder,
    vae_downsampling_factor,
    vae_fingerprint,
)

PLAN_FILE = "prepare.json"
RECORD_FIELDS = ("dicom_id", "subject_id", "study_id", "view", "caption")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: which rows of which split, where, and how."""

    folder: Path
    position: int
    first_key: int
    rows: list[dict[str, Any]]
    resolution: int
    vae_folder: str | None
    device: str
    latent_batch_size: int


@dataclass
class ShardResult:
    nsamples: int
    skipped: dict[str, int] = field(default_factory=dict)


@functools.cache
def frozen_vae(folder: str, device: str) -> AutoencoderKL:
    """One VAE per process, loaded on first use."""
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device).eval()


@torch.no_grad()
def posterior_moments(vae: AutoencoderKL, images: list, device: str) -> np.ndarray:
    """The VAE posterior of each image: mean and log-variance stacked on the channel axis (diffusers' layout)."""
    pixels = torch.stack([to_model_tensor(image) for image in images]).to(device)
    return vae.encode(pixels).latent_dist.parameters.float().cpu().numpy()


def write_one_shard(task: ShardTask) -> ShardResult:
    """Read, preprocess and (optionally) encode the task's rows, then write the shard and its sidecar."""
    kept: list[tuple[int, dict[str, Any], Any]] = []
    skipped: Counter[str] = Counter()
    for offset, row in enumerate(task.rows):
        try:
            image = resize_center_crop(load_grayscale_image(row["image_path"]), task.resolution)
        except UnreadableImageError as error:  # missing, corrupt, truncated, or a decompression bomb
            skipped[error.reason] += 1
            continue
        meta = {name: row[name] for name in RECORD_FIELDS}
        meta["labels"] = {name: None if np.isnan(row[name]) else float(row[name]) for name in CHEXPERT_LABELS}
        kept.append((task.first_key + offset, meta, image))
    moments: list[np.ndarray | None] = [None] * len(kept)
    if task.vae_folder is not None:
        vae = frozen_vae(task.vae_folder, task.device)
        for start in range(0, len(kept), task.latent_batch_size):
            batch = [image for _, _, image in kept[start : start + task.latent_batch_size]]
            moments[start : start + len(batch)] = list(posterior_moments(vae, batch, task.device))
    records = (encode_record(f"{key:09d}", image, meta, m) for (key, meta, image), m in zip(kept, moments, strict=True))
    shard = task.folder / shard_file_name(task.position)
    write_shard(shard, records)
    result = ShardResult(nsamples=len(kept), skipped=dict(skipped))
    write_json_atomically(shard.with_suffix(".json"), {"nsamples": result.nsamples, "skipped": result.skipped})
    return result


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def finished_result(folder: Path, position: int) -> ShardResult | None:
    """The result of a shard finished by an earlier run: its sidecar is written only after the tar is complete."""
    sidecar = (folder / shard_file_name(position)).with_suffix(".json")
    if not (sidecar.is_file() and sidecar.with_suffix(".tar").is_file()):
        return None
    return ShardResult(**json.loads(sidecar.read_text()))


def latents_vae_folder(cfg: DictConfig, root: Path) -> Path:
    """The VAE whose posteriors --latents stores: the autoencoder stage's cached one, or model.vae's folder."""
    if cfg.model.vae.pretrained == "auto":
        folder = vae_cache_folder(cfg, root)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"--latents with model.vae.pretrained=auto: no trained VAE at {folder}; "
                "train it first with `python train.py stage=autoencoder` (same config)"
            )
        return folder
    folder = pretrained_vae_folder(cfg.model)
    if folder is None:
        raise ConfigError("--latents needs a trained VAE: set model.vae.pretrained (or model.pretrained)")
    return folder


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Record what this --out holds; refuse to mix shards made with different settings."""
    path = out / PLAN_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        differing = sorted(key for key in plan.keys() | previous.keys() if plan.get(key) != previous.get(key))
        if differing:
            details = "; ".join(f"{key}: {previous.get(key)!r} there, {plan.get(key)!r} now" for key in differing)
            raise ConfigError(f"{path} was prepared with other settings ({details}); use a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, plan)


def prepare(
    cfg: DictConfig,
    out: Path,
    with_latents: bool = False,
    workers: int = 0,
    samples_per_shard: int = 1000,
    device: str = "cpu",
    latent_batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Write every split of ``cfg.data.splits`` under ``out``; returns each split's index metadata."""
    root = resolve_data_root(cfg.data)
    tokenizer = load_tokenizer(cfg.model, model_backbone(cfg.model))
    vae_folder = latents_vae_folder(cfg, root) if with_latents else None
    latents = None
    if vae_folder is not None:
        vae = frozen_vae(str(vae_folder), "cpu")
        size = cfg.data.resolution // vae_downsampling_factor(vae)
        latents = {"vae_fingerprint": vae_fingerprint(vae), "shape": [2 * vae.config.latent_channels, size, size]}
    splits = list(dict.fromkeys(cfg.data.splits.values()))
    plan = {
        "format_version": FORMAT_VERSION,
        "dataset_fingerprint": dataset_fingerprint(root),
        "resolution": int(cfg.data.resolution),
        "views": list(cfg.data.views),
        "caption_section": cfg.data.caption_section,
        "caption_max_tokens": int(tokenizer.model_max_length),
        "splits": splits,
        "samples_per_shard": samples_per_shard,
        "latents": latents,
    }
    check_plan(out, plan)

    indices = {}
    todo: list[tuple[str, int, int]] = []  # (split, shard position, first row) of each shard still to write
    results: dict[tuple[str, int], ShardResult] = {}
    for split in splits:
        index = build_mimic_index(
            root,
            cfg.data.reports_root,
            views=list(cfg.data.views),
            split=split,
            caption_section=cfg.data.caption_section,
            tokenizer=tokenizer,
        )
        indices[split] = index
        (out / split).mkdir(parents=True, exist_ok=True)
        for position, first in enumerate(range(0, len(index), samples_per_shard)):
            done = finished_result(out / split, position)
            if done is None:
                todo.append((split, position, first))
            else:
                results[(split, position)] = done

    def tasks() -> Iterator[ShardTask]:  # built one at a time: rows of a whole MIMIC split would be gigabytes
        for split, position, first in todo:
            rows = indices[split].samples.iloc[first : first + samples_per_shard].to_dict("records")
            vae = str(vae_folder) if vae_folder else None
            yield ShardTask(
                out / split, position, first, rows, int(cfg.data.resolution), vae, device, latent_batch_size
            )

    total = sum(min(samples_per_shard, len(indices[split]) - first) for split, _, first in todo)
    with tqdm(total=total, unit="img", desc=f"preparing {len(todo)} shards ({len(results)} already done)") as bar:
        for task, result in run_tasks(tasks(), workers):
            results[(task.folder.name, task.position)] = result
            bar.update(len(task.rows))
    return {split: write_split_index(out / split, index, plan, results) for split, index in indices.items()}


def write_split_index(
    folder: Path, index: MimicIndex, plan: dict[str, Any], results: dict[tuple[str, int], ShardResult]
) -> dict[str, Any]:
    """The split folder's wids descriptor (its non-empty shards) with our metadata; returns the metadata."""
    split = folder.name
    shards = {position: result for (name, position), result in sorted(results.items()) if name == split}
    skipped = Counter(index.skipped)
    for result in shards.values():
        skipped.update(result.skipped)
    metadata = {
        **{key: plan[key] for key in ("format_version", "dataset_fingerprint", "resolution", "views")},
        **{key: plan[key] for key in ("caption_section", "latents")},
        "split": split,
        "samples": sum(result.nsamples for result in shards.values()),
        "skipped": dict(sorted(skipped.items())),
        "truncated_captions": index.truncated_captions,
        "caption_max_tokens": plan["caption_max_tokens"],
    }
    shardlist = [
        {"url": shard_file_name(position), "nsamples": result.nsamples}
        for position, result in shards.items()
        if result.nsamples
    ]
    descriptor = {"wids_version": 1, "name": split, "shardlist": shardlist, METADATA_KEY: metadata}
    write_json_atomically(folder / INDEX_FILE, descriptor)
    return metadata


def run_tasks(tasks: Iterable[ShardTask], workers: int) -> Iterator[tuple[ShardTask, ShardResult]]:
    """(task, result) in task order; in this process for workers <= 1, else in spawned one-thread processes.

    At most two tasks per worker are in flight, so memory stays bounded however many shards there are.
    """
    if workers <= 1:
        for task in tasks:
            yield task, write_one_shard(task)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        in_flight: deque[tuple[ShardTask, Future]] = deque()
        for task in tasks:
            in_flight.append((task, pool.submit(write_one_shard, task)))
            if len(in_flight) >= 2 * workers:
                done, future = in_flight.popleft()
                yield done, future.result()
        while in_flight:
            done, future = in_flight.popleft()
            yield done, future.result()


def describe(split: str, metadata: dict[str, Any]) -> str:
    """One line per split, worded as the training log and train.py's end-of-run summary word it."""
    latents = "with latents" if metadata["latents"] else "no latents"
    truncated = f"{metadata['truncated_captions']:,} captions truncated to {metadata['caption_max_tokens']} tokens"
    skipped = describe_skips(metadata["skipped"])
    return f"{split}: {metadata['samples']:,} samples ({latents}); skipped: {skipped}; {truncated}"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (re-run to finish it)")
    parser.add_argument("--config", action="append", default=[], help="a YAML file merged over the defaults")
    parser.add_argument("--latents", action="store_true", help="also store the frozen VAE's posterior per image")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (<=1: this one)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --latents")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.resolution=512")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1:
        parser.error("--samples-per-shard must be at least 1")
    try:
        cfg = load_config(args.config, args.overrides)
        summaries = prepare(cfg, args.out, args.latents, args.workers, args.samples_per_shard, args.device)
    except ConfigError as error:
        raise SystemExit(f"config error: {error}") from None
    for split, metadata in summaries.items():
        print(describe(split, metadata))
    print(f"train on it with: python train.py data.format=shards data.shards={args.out}")
    return summaries


if __name__ == "__main__":
    main()
