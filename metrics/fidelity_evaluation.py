"""Measure a model's fidelity on held-out reports: FID, classifier agreement, diversity (in training and offline).

The prompts are the report captions of M held-out samples (``fidelity.split``, a fixed seeded subset), the FID
reference is those samples' real images. ``FidelityEvaluation`` holds what one measurement needs and is shared by
``callbacks.fidelity.FIDCallback`` and the command line:

    python evaluate.py fidelity --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --out eval/fidelity
    python evaluate.py fidelity --model runs/<name>/<run>/pipeline --out eval/fid-xrv --num-images 5000
        --extractor xrv data.root=/data/mimic-cxr-jpg/2.1.0 fidelity.xrv_weights=/models/xrv-all.pt   (one line)

writes ``fidelity.json``, ``fidelity.md`` and ``samples.png`` into ``--out``. Generation is split into fixed
batches with fixed seeds, dealt round-robin to processes, so the images (and the metrics) do not depend on the
number of processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from callbacks.image_logging import image_grid
from datamodules.cxr_datamodule import dataset_fingerprint, resolve_data_root
from datamodules.mimic import CHEXPERT_LABELS, MimicCxrDataset, MimicIndex, build_mimic_index, collate_skipping_bad
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from metrics.domain_classifier import ensure_domain_classifier, finding_targets
from metrics.feature_extractors import EXTRACTORS, FeatureExtractor, build_feature_extractor
from metrics.fidelity import FidelityMetrics, ReferenceStatistics, reference_cache_file, reference_statistics

log = logging.getLogger(__name__)

CLASSIFIERS = ("domain", "xrv")
SAMPLE_GRID_IMAGES = 16
SELECTION_SEED = 0  # fixed: every run and every M draws its held-out samples from the same permutation
DIVERSITY_SEED_OFFSET = 1_000_000  # diversity images get seeds of their own, whatever M


def held_out_selection(cfg: DictConfig, root: Path, num_images: int) -> MimicIndex:
    """``num_images`` samples of ``fidelity.split``: a prefix of a fixed random permutation (random halves).

    A split with fewer usable samples gives all of them (with a warning): M in the metric names says how many.
    """
    index = build_mimic_index(
        root,
        cfg.data.reports_root,
        views=list(cfg.data.views),
        split=cfg.fidelity.split,
        caption_section=cfg.data.caption_section,
    )
    if len(index) < 2 or num_images < 2:
        raise ValueError(
            f"FID needs at least 2 images per set: M={num_images} requested (fidelity.num_images or "
            f"callbacks.fidelity.num_images), fidelity.split '{cfg.fidelity.split}' under {root} has {len(index)}"
        )
    if num_images > len(index):
        log.warning(
            "fidelity: M=%d requested but split '%s' has %d usable samples; using M=%d",
            num_images,
            cfg.fidelity.split,
            len(index),
            len(index),
        )
        num_images = len(index)
    chosen = np.random.default_rng(SELECTION_SEED).permutation(len(index))[:num_images]
    return replace(index, samples=index.samples.iloc[chosen].reset_index(drop=True))


@dataclass
class FidelityResult:
    metrics: dict[str, float]
    samples: torch.Tensor | None  # the first generated images (process 0), for a grid
    sample_captions: list[str]


class FidelityEvaluation:
    """Held-out prompts, feature extractor, classifier and FID reference for one configuration and M."""

    def __init__(self, cfg: DictConfig, root: Path, num_images: int, num_inference_steps: int | None = None) -> None:
        settings = cfg.fidelity
        if settings.extractor not in EXTRACTORS:
            raise ValueError(f"fidelity.extractor must be one of {EXTRACTORS}, got '{settings.extractor}'")
        if settings.classifier not in CLASSIFIERS:
            raise ValueError(f"fidelity.classifier must be one of {CLASSIFIERS}, got '{settings.classifier}'")
        if settings.diversity.num_prompts and settings.diversity.images_per_prompt < 2:
            raise ValueError("fidelity.diversity.images_per_prompt must be at least 2 (or set num_prompts=0)")
        self.cfg, self.root, self.settings = cfg, Path(root), settings
        self.num_inference_steps = num_inference_steps or settings.num_inference_steps
        self.index = held_out_selection(cfg, self.root, num_images)
        self.num_images = len(self.index)
        self.captions: list[str] = self.index.samples["caption"].tolist()
        labels = torch.tensor(self.index.samples[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32))
        self.targets = finding_targets(labels)
        self.diversity_prompts = self.captions[: settings.diversity.num_prompts]
        self._extractors: dict[str, FeatureExtractor] = {}

    def extractor(self, name: str) -> FeatureExtractor:
        """Built once; ``domain`` trains and caches the classifier first when it is missing."""
        if name not in self._extractors:
            folder = ensure_domain_classifier(self.cfg, self.root) if name == "domain" else None
            self._extractors[name] = build_feature_extractor(
                name, folder, self.settings.inception_weights, self.settings.xrv_weights
            )
        return self._extractors[name]

    def real_image_batches(self) -> Iterator[torch.Tensor]:
        """The selected held-out images in [0, 1], (B, 3, R, R) at ``data.resolution``."""
        loader = DataLoader(
            MimicCxrDataset(self.index, self.cfg.data.resolution),
            batch_size=self.settings.batch_size,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_skipping_bad,
        )
        for batch in loader:
            if len(batch["caption"]):
                yield (batch["pixel_values"] + 1) / 2

    def reference(self) -> ReferenceStatistics:
        """The real images' statistics, cached by data, split, views, resolution, extractor (and weights) and M."""
        extractor = self.extractor(self.settings.extractor)
        key = {
            "data": dataset_fingerprint(self.root),
            "split": self.settings.split,
            "views": list(self.cfg.data.views),
            "caption_section": self.cfg.data.caption_section,
            "resolution": self.cfg.data.resolution,
            "extractor": extractor.identity,
            "num_images": self.num_images,
            "selection_seed": SELECTION_SEED,
        }
        cache_file = reference_cache_file(self.cfg.data.cache_dir, key)
        return reference_statistics(extractor, self.real_image_batches, cache_file)

    def build_metrics(self, reference: ReferenceStatistics | None) -> FidelityMetrics:
        """Metrics for this evaluation; pass the reference on exactly one process (the sync sums statistics)."""
        metrics = FidelityMetrics(
            self.extractor(self.settings.extractor),
            self.extractor(self.settings.classifier),
            self.num_images,
            measure_diversity=bool(self.diversity_prompts),
        )
        if reference is not None:
            metrics.load_reference(reference.statistics)
        return metrics

    def evaluate(
        self,
        module: LatentDiffusionModule,
        metrics: FidelityMetrics,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> FidelityResult:
        """Generate this process's share of images with ``module.sample`` and return the synced metrics.

        Every process must call it (the metrics sync is collective).
        """
        settings, batch_size = self.settings, self.settings.batch_size
        steps, guidance = self.num_inference_steps, settings.guidance_scale
        metrics.reset()
        metrics.to(module.device)
        num_batches = math.ceil(self.num_images / batch_size)
        jobs = [("fid", batch) for batch in range(num_batches)]
        jobs += [("diversity", prompt) for prompt in range(len(self.diversity_prompts))]
        samples, sample_captions = None, []
        for kind, number in tqdm(jobs[rank::world_size], desc="fidelity", unit="batch", disable=not progress):
            if kind == "fid":
                chosen = slice(number * batch_size, min((number + 1) * batch_size, self.num_images))
                prompts = self.captions[chosen]
                images = module.sample(prompts, steps, guidance, settings.seed + number)
                indices = torch.arange(chosen.start, chosen.stop)
                metrics.update(images.to(module.device), self.targets[chosen], indices)
                if number == 0:
                    samples, sample_captions = images[:SAMPLE_GRID_IMAGES], prompts[:SAMPLE_GRID_IMAGES]
            else:
                prompts = [self.diversity_prompts[number]] * settings.diversity.images_per_prompt
                seed = settings.seed + DIVERSITY_SEED_OFFSET + number
                images = module.sample(prompts, steps, guidance, seed)
                metrics.update_diversity(images.to(module.device))
        return FidelityResult(metrics.compute(), samples, sample_captions)


# ------------------------------------------------------------------------------------------------- command line
def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "fidelity",
        help="FID, classifier agreement and MS-SSIM diversity of a checkpoint or diffusers folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a run's .ckpt (beside ../config.yaml) or a diffusers folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for fidelity.json, fidelity.md, samples.png")
    parser.add_argument("--num-images", type=int, help="M generated and real images (default: fidelity.num_images)")
    parser.add_argument("--extractor", choices=EXTRACTORS, help="FID features (default: fidelity.extractor)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=... fidelity.seed=1")
    parser.set_defaults(run=run_fidelity)


def run_fidelity(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.num_images is not None:
        overrides.append(f"fidelity.num_images={args.num_images}")
    if args.extractor is not None:
        overrides.append(f"fidelity.extractor={args.extractor}")
    started = time.perf_counter()
    module, cfg = load_diffusion_module(args.model, overrides)
    module.to(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    root = resolve_data_root(cfg.data)
    evaluation = FidelityEvaluation(cfg, root, cfg.fidelity.num_images)
    reference = evaluation.reference()
    result = evaluation.evaluate(module, evaluation.build_metrics(reference), progress=True)
    summary = {
        "model": str(args.model),
        "metrics": result.metrics,
        "real_halves_fid": None if math.isnan(reference.real_halves_fid) else reference.real_halves_fid,
        "num_images": evaluation.num_images,
        "extractor": cfg.fidelity.extractor,
        "classifier": cfg.fidelity.classifier,
        "num_inference_steps": evaluation.num_inference_steps,
        "guidance_scale": cfg.fidelity.guidance_scale,
        "seed": cfg.fidelity.seed,
        "split": cfg.fidelity.split,
        "diversity_prompts": evaluation.diversity_prompts,
        "images_per_prompt": cfg.fidelity.diversity.images_per_prompt,
        "data_root": str(root),
        "data_fingerprint": dataset_fingerprint(root),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_summary(args.out, summary, result)
    print(f"[fidelity] {json.dumps(result.metrics)}\n[fidelity] written to {args.out}")
    return summary


def write_summary(out_dir: Path, summary: dict, result: FidelityResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity.json").write_text(json.dumps(summary, indent=2))
    m, halves = summary["num_images"], summary["real_halves_fid"]
    halves = "n/a (M < 4)" if halves is None else f"{halves:.4f}"
    lines = [
        f"# Fidelity of `{summary['model']}`",
        "",
        f"M = {m} prompts from the report captions of split `{summary['split']}` "
        f"({summary['num_inference_steps']} DDIM steps, guidance {summary['guidance_scale']}, seed {summary['seed']}); "
        f"FID features: `{summary['extractor']}`, agreement classifier: `{summary['classifier']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in result.metrics.items()),
        f"| real held-out set, half vs half (FID floor at M/2 = {m // 2}) | {halves} |",
        "",
        "Lower FID and MS-SSIM are better (MS-SSIM among images of one prompt: lower = more diverse); "
        "agreement AUROC: 0.5 = chance, 1 = every generated image shows the findings its prompt names.",
        "",
        f"Data: {summary['data_root']} (fingerprint {summary['data_fingerprint']}); {summary['seconds']} s.",
    ]
    if result.samples is not None:
        image_grid(result.samples, result.sample_captions).save(out_dir / "samples.png")
        lines += ["", "![samples](samples.png)"]
    (out_dir / "fidelity.md").write_text("\n".join(lines) + "\n")
