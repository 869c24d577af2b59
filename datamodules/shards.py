"""Prepared training data as WebDataset tar shards, read by index through ``wids`` (WebDataset's indexed reader).

A prepared folder holds one sub-folder per split: ``shard-000000.tar``, ... and ``index.json``, a wids dataset
descriptor (``wids_version``, ``shardlist`` of ``{url, nsamples}``) whose ``cxr_diffusion`` entry records how the
shards were made (resolution, views, caption section, dataset fingerprint, and the VAE fingerprint when the shards
hold latents). Each record, keyed by its position, holds:

- ``.png``: the preprocessed 8-bit grayscale image (resized and centre-cropped by ``datamodules.transforms``),
  lossless, so it decodes to exactly the pixels the folder reader computes;
- ``.json``: dicom_id, subject_id, study_id, view, caption and the CheXpert labels (null = not mentioned);
- ``.moments.npy`` (optional): the frozen VAE's posterior, mean and log-variance stacked on the channel axis.

Shards may live in a local folder or behind any URL wids downloads (http(s)://, s3://, gs://, pipe:); remote
shards are cached under ``cache_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import wids
from PIL import Image
from torch.utils.data import Dataset
from webdataset import TarWriter
from wids.wids_specs import load_dsdesc_and_resolve, urldir

from configs import ConfigError
from datamodules.mimic import CHEXPERT_LABELS
from datamodules.skips import SKIP_UNREADABLE_RECORD, SkippedSample
from datamodules.transforms import UnreadableImageError, load_grayscale_image, to_model_tensor

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
METADATA_KEY = "cxr_diffusion"
IMAGE_FIELD, META_FIELD, MOMENTS_FIELD = "png", "json", "moments.npy"


def shard_file_name(position: int) -> str:
    return f"shard-{position:06d}.tar"


def encode_record(key: str, image: Image.Image, meta: dict[str, Any], moments: np.ndarray | None) -> dict[str, Any]:
    """One WebDataset record: PNG pixels, JSON metadata and, optionally, the VAE posterior as .npy."""
    png = io.BytesIO()
    image.save(png, format="PNG")
    record = {"__key__": key, IMAGE_FIELD: png.getvalue(), META_FIELD: json.dumps(meta, sort_keys=True).encode()}
    if moments is not None:
        npy = io.BytesIO()
        np.save(npy, np.ascontiguousarray(moments, dtype=np.float32))
        record[MOMENTS_FIELD] = npy.getvalue()
    return record


def write_shard(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records to ``path`` atomically (a partial file never takes the final name), byte-reproducibly."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as stream:
        with TarWriter(stream, mtime=0.0, user="", group="", mode=0o444, encoder=False) as tar:
            for record in records:
                tar.write(record)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


def is_url(location: str) -> bool:
    return urllib.parse.urlparse(str(location)).scheme not in ("", "file") or str(location).startswith("pipe:")


def split_index_location(shards: str | Path, split: str) -> str:
    """``<shards>/<split>/index.json`` for a local folder or a URL."""
    return f"{str(shards).rstrip('/')}/{split}/{INDEX_FILE}"


def load_split_index(shards: str | Path, split: str) -> dict[str, Any]:
    """A split's wids descriptor, shard URLs resolved, checked; a clear error when it was never prepared."""
    location = split_index_location(shards, split)
    if not is_url(location) and not Path(location).is_file():
        raise FileNotFoundError(
            f"no prepared split '{split}' at {location}: run `python -m datamodules.prepare --out {shards}` first"
        )
    try:
        descriptor = load_dsdesc_and_resolve(location, base=urldir(location))  # shard URLs beside the index
    except (json.JSONDecodeError, AssertionError, KeyError) as error:  # wids checks descriptors with asserts
        raise ValueError(f"{location} is not a valid shard index ({error!r}); prepare the data again") from error
    metadata = descriptor.get(METADATA_KEY)
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{location} was not written by datamodules.prepare (format version {FORMAT_VERSION})")
    return descriptor


def read_split_metadata(shards: str | Path, split: str) -> dict[str, Any]:
    """The ``cxr_diffusion`` entry of a split's index: how its shards were prepared."""
    return load_split_index(shards, split)[METADATA_KEY]


def check_cached_latents(latents: dict[str, Any], location: str, vae_fingerprint: str, vae_trainable: bool) -> None:
    """Refuse latents that would be stale: a trainable VAE changes under them, another VAE never made them."""
    if vae_trainable:
        raise ConfigError(
            f"{location} holds cached latents, but model.trainable includes vae: they would go stale as the VAE "
            "trains; set data.use_cached_latents=false to encode pixels on the fly"
        )
    if latents["vae_fingerprint"] != vae_fingerprint:
        raise ConfigError(
            f"{location} holds latents of another VAE (fingerprint {latents['vae_fingerprint']}, this run's VAE is "
            f"{vae_fingerprint}); prepare the shards again with --latents and this VAE, "
            "or set data.use_cached_latents=false"
        )


class ShardCacheName:
    """Where wids keeps a shard: remote ones are downloaded into ``cache_dir``; local ones are linked there.

    wids locks and opens the shard at the returned path, so a local shard is symlinked rather than copied,
    and the lock file lands in the cache, never beside a read-only dataset.
    """

    def __init__(self, cache_dir: str | Path, version: str) -> None:
        self.cache_dir, self.version = Path(cache_dir), version

    def __call__(self, url: str) -> str:
        # Keyed by the shards' folder and the index's metadata: shards prepared anew at the same URL get a new folder.
        key = f"{os.path.dirname(url)}\n{self.version}"
        folder = self.cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / os.path.basename(urllib.parse.urlparse(url).path)
        if not is_url(url) and not local.exists():
            source = Path(urllib.parse.urlparse(url).path).resolve()
            with contextlib.suppress(FileExistsError):  # another worker linked it first
                local.symlink_to(source)
        return str(local)


class ShardDataset(Dataset):
    """Map-style access to one prepared split; returns the folder reader's sample dicts.

    ``read_pixels``/``read_latents`` choose what is decoded: training on cached latents never decodes a PNG.
    A record that cannot be decoded gives a SkippedSample (dropped and passed on by ``collate_skipping_bad``).
    """

    def __init__(
        self,
        shards: str | Path,
        split: str,
        cache_dir: str | Path,
        read_pixels: bool = True,
        read_latents: bool = False,
    ) -> None:
        self.location = split_index_location(shards, split)
        descriptor = load_split_index(shards, split)  # fetched once; workers reuse its resolved shard list
        self.metadata, self.shardlist = descriptor[METADATA_KEY], descriptor["shardlist"]
        if read_latents and self.metadata.get("latents") is None:
            raise ValueError(f"{self.location} holds no latents (prepare with --latents)")
        self.read_pixels, self.read_latents = read_pixels, read_latents
        self.cache_dir = Path(cache_dir)
        self._reader: wids.ShardListDataset | None = None
        self.shard_sizes = [shard["nsamples"] for shard in self.shardlist]

    def reader(self) -> wids.ShardListDataset:
        """The wids dataset, opened lazily so each DataLoader worker opens (and memory-maps) its own shards."""
        if self._reader is None:
            announcement = io.StringIO()
            with contextlib.redirect_stderr(announcement):  # wids prints a line per dataset; keep it for debugging
                self._reader = wids.ShardListDataset(
                    self.shardlist,
                    localname=ShardCacheName(self.cache_dir, json.dumps(self.metadata, sort_keys=True)),
                    transformations=[],
                    lru_size=4,
                )
            log.debug("wids: %s", announcement.getvalue().strip())
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def __getitem__(self, item: int) -> dict[str, Any] | SkippedSample:
        sample_id = f"{self.location}#{item}"
        try:
            record = self.reader()[item]
            meta = json.load(record["." + META_FIELD])
            sample_id = str(meta["dicom_id"])
            sample = {
                "caption": meta["caption"],
                "dicom_id": meta["dicom_id"],
                "labels": torch.tensor(
                    [np.nan if meta["labels"][name] is None else meta["labels"][name] for name in CHEXPERT_LABELS],
                    dtype=torch.float32,
                ),
            }
            if self.read_pixels:
                sample["pixel_values"] = to_model_tensor(load_grayscale_image(record["." + IMAGE_FIELD]))
            if self.read_latents:
                sample["latent_moments"] = torch.from_numpy(np.load(record["." + MOMENTS_FIELD]))
        except UnreadableImageError as error:
            log.warning("skipping sample %s (%d of %s): %s", sample_id, item, self.location, error)
            return SkippedSample(sample_id, error.reason)
        # A damaged record, or a truncated or missing shard (wids then lacks the index: IndexError).
        except (KeyError, IndexError, ValueError, OSError) as error:
            log.warning("skipping unreadable sample %d of %s: %s", item, self.location, error)
            return SkippedSample(sample_id, SKIP_UNREADABLE_RECORD)
        return sample
