"""A small chest-X-ray finding classifier trained on the configured dataset: the `domain` feature extractor.

Why: FID and classifier agreement need a network that knows what chest X-ray findings look like. No pretrained
weights exist for the embedded synthetic set, and the pretrained ones (Inception, torchxrayvision) need GPU-only
extras; this CNN is trained by the project on the training split of whatever data is configured, in seconds on
the synthetic set. Its pooled penultimate activations are the FID features, its 8 sigmoid outputs (the MS-CXR
categories, which are CheXpert columns) score generated images for the findings their prompts name.

Training is seeded and cached under ``data.cache_dir`` by dataset fingerprint, resolution, views, split and
recipe: ``ensure_domain_classifier(cfg, root)`` returns the cached folder, training it first when absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from datamodules.cxr_datamodule import dataset_fingerprint
from datamodules.mimic import CHEXPERT_LABELS, MimicCxrDataset, MimicIndex, build_mimic_index, collate_skipping_bad
from datamodules.mscxr import MS_CXR_CATEGORIES
from datamodules.skips import SkipLedger, describe_skips

log = logging.getLogger(__name__)
FINDINGS = MS_CXR_CATEGORIES
WEIGHTS_FILE = "classifier.safetensors"
INFO_FILE = "classifier.json"
_FINDING_COLUMNS = [CHEXPERT_LABELS.index(finding) for finding in FINDINGS]


def finding_targets(chexpert_labels: torch.Tensor) -> torch.Tensor:
    """(N, 14) CheXpert rows -> (N, 8) targets: 1 positive, 0 negative or not mentioned, -1 uncertain (ignored)."""
    labels = chexpert_labels[:, _FINDING_COLUMNS]
    targets = (labels == 1.0).float()
    return torch.where(labels == -1.0, torch.full_like(targets, -1.0), targets)


class FindingClassifier(nn.Module):
    """Four stride-2 stages of two 3x3 convolutions, global average pooling, one linear layer per finding.

    Input: (N, 1, R, R) grayscale in [-1, 1] at the training resolution R. ``features`` are the pooled
    penultimate activations (4 * width values), ``forward`` the 8 finding logits.
    """

    def __init__(self, resolution: int, width: int = 16) -> None:
        super().__init__()
        self.resolution, self.width = resolution, width
        channels = [1, width, 2 * width, 4 * width, 4 * width]
        stages = []
        for in_channels, out_channels in zip(channels[:-1], channels[1:], strict=True):
            stages += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*stages)
        self.num_features = channels[-1]
        self.head = nn.Linear(self.num_features, len(FINDINGS))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values).mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def _index(cfg: DictConfig, root: Path, split: str) -> MimicIndex:
    return build_mimic_index(
        root,
        cfg.data.reports_root,
        views=list(cfg.data.views),
        split=split,
        caption_section=cfg.data.caption_section,
    )


def load_labelled_images(
    index: MimicIndex, resolution: int, max_images: int | None = None, seed: int = 0, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, R, R) uint8 grayscale images and (N, 8) finding targets of ``index``, decoded once into memory.

    At most ``max_images`` samples, a seeded random subset, so a real dataset's classifier stays cheap.
    """
    if max_images is not None and max_images < len(index):
        chosen = np.sort(np.random.default_rng(seed).permutation(len(index))[:max_images])
        index = replace(index, samples=index.samples.iloc[chosen].reset_index(drop=True))
    loader = DataLoader(
        MimicCxrDataset(index, resolution), batch_size=64, num_workers=num_workers, collate_fn=collate_skipping_bad
    )
    images, targets = [], []
    skipped = SkipLedger()  # undecodable images are left out (datamodules.transforms.load_grayscale_image)
    for batch in loader:
        skipped.add(batch["skipped"])
        if len(batch["caption"]):
            gray = batch["pixel_values"].mean(dim=1, keepdim=True)
            images.append(((gray + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
            targets.append(finding_targets(batch["labels"]))
    if len(skipped):
        log.warning("domain classifier images: skipped %s", describe_skips(skipped.counts()))
    return torch.cat(images), torch.cat(targets)


def to_classifier_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 1, H, W) in [0, 255] or float (N, C, H, W) in [0, 1] -> float (N, 1, R, R) in [-1, 1]."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    gray = images.mean(dim=1, keepdim=True) * 2 - 1
    if gray.shape[-2:] != (resolution, resolution):
        gray = F.interpolate(gray, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return gray


def _shifted(pixel_values: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (edge-replicated): robustness to framing, not to laterality."""
    if max_shift == 0:
        return pixel_values
    size = pixel_values.shape[-1]
    padded = F.pad(pixel_values, [max_shift] * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + size, dx : dx + size]


def train_finding_classifier(
    images: torch.Tensor,
    targets: torch.Tensor,
    width: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    max_shift: int,
    seed: int,
) -> FindingClassifier:
    """Seeded AdamW (one-cycle schedule) on per-finding binary cross-entropy, uncertain labels left out.

    ``images``: (N, 1, R, R) uint8 as from ``load_labelled_images``; returns the classifier in eval mode.
    Its initialisation draws from the global stream, seeded inside a fork: it may be trained in the middle of a
    diffusion run (on process 0 only), whose own random state must not depend on whether the cache was warm.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = FindingClassifier(images.shape[-1], width)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    order = torch.randperm(len(images), generator=generator)
    position = 0
    classifier.train()
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        chosen = order[position : position + batch_size]
        position += batch_size
        pixels = _shifted(to_classifier_input(images[chosen], classifier.resolution), max_shift, generator)
        known = targets[chosen] >= 0
        logits = classifier(pixels)
        loss = F.binary_cross_entropy_with_logits(logits[known], targets[chosen][known])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval()


@torch.no_grad()
def finding_scores(classifier: FindingClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 8) sigmoid scores of uint8 or [0, 1] images."""
    classifier.eval()
    chunks = [
        torch.sigmoid(classifier(to_classifier_input(images[start : start + batch_size], classifier.resolution)))
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def finding_aurocs(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """ROC AUC of (N, 8) scores against (N, 8) targets per finding, uncertain (-1) left out, and the mean.

    A finding whose targets lack positives or negatives has no AUC (NaN) and is left out of the mean.
    """
    results: dict[str, float] = {}
    for column, finding in enumerate(FINDINGS):
        known = targets[:, column] >= 0
        column_targets = targets[known, column].long()
        if 0 < int(column_targets.sum()) < len(column_targets):
            results[finding] = float(binary_auroc(scores[known, column].float(), column_targets))
        else:
            results[finding] = float("nan")
    values = [value for value in results.values() if not np.isnan(value)]
    results["mean"] = float(np.mean(values)) if values else float("nan")
    return results


def domain_classifier_folder(cfg: DictConfig, root: Path) -> Path:
    """Where the classifier for this data, views, split and recipe (resolution included) is cached."""
    key = json.dumps(
        {
            "data": dataset_fingerprint(root),
            "views": list(cfg.data.views),
            "split": cfg.data.splits.train,
            "recipe": OmegaConf.to_container(cfg.fidelity.domain_classifier, resolve=True),
        },
        sort_keys=True,
    )
    return Path(cfg.data.cache_dir) / "domain_classifier" / hashlib.sha256(key.encode()).hexdigest()[:16]


def train_and_cache_domain_classifier(cfg: DictConfig, root: Path) -> Path:
    """Train on ``data.splits.train``, measure held-out AUROC on ``data.splits.val``, write the cache folder."""
    recipe = cfg.fidelity.domain_classifier
    started = time.perf_counter()
    train_index = _index(cfg, root, cfg.data.splits.train)
    images, targets = load_labelled_images(
        train_index, recipe.resolution, recipe.max_images, recipe.seed, cfg.data.num_workers
    )
    classifier = train_finding_classifier(
        images,
        targets,
        width=recipe.width,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        max_shift=recipe.max_shift,
        seed=recipe.seed,
    )
    seconds = time.perf_counter() - started
    held_out_images, held_out_targets = load_labelled_images(
        _index(cfg, root, cfg.data.splits.val), recipe.resolution, num_workers=cfg.data.num_workers
    )
    info = {
        "resolution": classifier.resolution,
        "width": classifier.width,
        "findings": list(FINDINGS),
        "training_images": len(images),
        "training_seconds": round(seconds, 1),
        "held_out_split": cfg.data.splits.val,
        "held_out_images": len(held_out_images),
        "held_out_auroc": finding_aurocs(finding_scores(classifier, held_out_images), held_out_targets),
        "data_root": str(root),
        "data_fingerprint": dataset_fingerprint(root),
        "recipe": OmegaConf.to_container(recipe, resolve=True),
    }
    folder = domain_classifier_folder(cfg, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    save_file(classifier.state_dict(), str(staging / WEIGHTS_FILE))
    (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def ensure_domain_classifier(cfg: DictConfig, root: Path) -> Path:
    """The cached classifier folder for this configuration, trained first if absent (prints what it did)."""
    folder = domain_classifier_folder(cfg, root)
    if not (folder / WEIGHTS_FILE).is_file():
        recipe = cfg.fidelity.domain_classifier
        print(f"[domain classifier] training on {root} ({cfg.data.splits.train} split, {recipe.resolution} px)")
        folder = train_and_cache_domain_classifier(cfg, root)
        info = json.loads((folder / INFO_FILE).read_text())
        print(
            f"[domain classifier] held-out mean AUROC {info['held_out_auroc']['mean']:.3f} "
            f"in {info['training_seconds']} s; cached at {folder}"
        )
    return folder


def load_domain_classifier(folder: str | Path) -> FindingClassifier:
    """The cached classifier in eval mode, frozen."""
    folder = Path(folder)
    info_file, weights_file = folder / INFO_FILE, folder / WEIGHTS_FILE
    if not info_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"no domain classifier in {folder}: expected {INFO_FILE} and {WEIGHTS_FILE} "
            "(train one with `python -m metrics.train_classifier`)"
        )
    info = json.loads(info_file.read_text())
    classifier = FindingClassifier(info["resolution"], info["width"])
    classifier.load_state_dict(load_file(str(weights_file)))
    return classifier.eval().requires_grad_(False)
