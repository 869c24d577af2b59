"""Measure a model's fidelity on held-out reports: FID, classifier agreement, diversity (in training and offline).

The prompts are the report captions of M held-out samples (``fidelity.split``, a fixed seeded subset), the FID
reference is those samples' real images. ``FidelityEvaluation`` holds what one measurement needs and is shared by
``callbacks.fidelity.FIDCallback`` and the command line:

    python evaluate.py fidelity --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --out eval/fidelity
    python evaluate.py fidelity --model runs/<name>/<run>/pipeline --out eval/fid --num-images 5000 --device cuda
        --extractors inception,xrv data.root=/data/mimic-cxr-jpg/2.1.0 fidelity.autocast=bf16
        fidelity.inception_weights=/models/weights-inception-2015-12-05-6726825d.pth
        fidelity.xrv_weights=/models/xrv-all.pt                                                   (one line)

writes ``fidelity.json``, ``fidelity.md`` and ``samples.png`` into ``--out``. Generation is split into fixed
batches with fixed seeds, dealt round-robin to processes, so the images (and the metrics) do not depend on the
number of processes. The M images are generated once; every extractor of ``fidelity.extractors`` computes its FID
(``fid/<extractor>@M``) from them. The model, the extractors and the real images' reference statistics all run on
the evaluation device (``--device``; in training the training device).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.cxr_datamodule import dataset_fingerprint, resolve_data_root
from datamodules.mimic import CHEXPERT_LABELS, MimicCxrDataset, MimicIndex, build_mimic_index, collate_skipping_bad
from lightning_modules.devices import add_device_argument
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from metrics.domain_classifier import ensure_domain_classifier, finding_targets
from metrics.feature_extractors import (
    EXTRACTORS,
    FeatureExtractor,
    MissingFeatureExtractorError,
    build_feature_extractor,
)
from metrics.fidelity import (
    FidelityMetrics,
    FrechetDistance,
    ReferenceStatistics,
    reference_cache_file,
    reference_statistics,
)
from metrics.pictures import image_grid

log = logging.getLogger(__name__)

CLASSIFIERS = ("domain", "xrv")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
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


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """``fidelity.autocast``: the dtype generation runs in under autocast, or None for the module's own precision."""
    if name is not None and name not in AUTOCAST_DTYPES:
        raise ValueError(f"fidelity.autocast must be one of {list(AUTOCAST_DTYPES)} or null, got '{name}'")
    return None if name is None else AUTOCAST_DTYPES[name]


class FidelityEvaluation:
    """Held-out prompts, feature extractors, classifier and FID references for one configuration and M.

    ``inception`` and ``xrv`` are built here, so missing packages or weight files fail at construction (before
    training starts); the ``domain`` classifier is trained (if not cached) when first needed, on one process.
    """

    def __init__(self, cfg: DictConfig, root: Path, num_images: int, num_inference_steps: int | None = None) -> None:
        settings = cfg.fidelity
        names = list(settings.extractors) if isinstance(settings.extractors, ListConfig) else None
        if not names or len(set(names)) != len(names) or not set(names) <= set(EXTRACTORS):
            raise ValueError(
                f"fidelity.extractors must be a list of distinct names from {EXTRACTORS}, got {settings.extractors}"
            )
        if settings.classifier not in CLASSIFIERS:
            raise ValueError(f"fidelity.classifier must be one of {CLASSIFIERS}, got '{settings.classifier}'")
        if settings.diversity.num_prompts and settings.diversity.images_per_prompt < 2:
            raise ValueError("fidelity.diversity.images_per_prompt must be at least 2 (or set num_prompts=0)")
        self.cfg, self.root, self.settings = cfg, Path(root), settings
        self.extractor_names: tuple[str, ...] = tuple(names)
        self.autocast_dtype = autocast_dtype(settings.autocast)
        self._extractors: dict[str, FeatureExtractor] = {}
        missing = []
        for name in dict.fromkeys([*names, settings.classifier]):
            if name != "domain":
                try:
                    self.extractor(name)  # now: a missing package or weights file fails before any work
                except MissingFeatureExtractorError as error:
                    missing.append(str(error))
        if missing:
            raise MissingFeatureExtractorError("\n".join(missing))
        self.num_inference_steps = num_inference_steps or settings.num_inference_steps
        self.index = held_out_selection(cfg, self.root, num_images)
        self.num_images = len(self.index)
        self.captions: list[str] = self.index.samples["caption"].tolist()
        labels = torch.tensor(self.index.samples[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32))
        self.targets = finding_targets(labels)
        self.diversity_prompts = self.captions[: settings.diversity.num_prompts]

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

    def reference(self, device: torch.device | str = "cpu") -> dict[str, ReferenceStatistics]:
        """Each extractor's statistics of the real images, by name, extracted on ``device`` unless cached.

        One cache file per extractor, keyed by data, split, views, resolution, the network and its weights, and M.
        """
        references = {}
        for name in self.extractor_names:
            extractor = self.extractor(name).to(device)
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
            references[name] = reference_statistics(extractor, self.real_image_batches, cache_file)
        return references

    @torch.no_grad()
    def autoencoder_floor(
        self, module: LatentDiffusionModule, references: Mapping[str, ReferenceStatistics]
    ) -> dict[str, float]:
        """Each extractor's FID of the real held-out images against their own VAE reconstructions (posterior mode),
        on this one process: a generator that decodes through this VAE is judged against this floor, not 0.

        Why: two runs can differ in FID because their autoencoders do (the embedded default trains one per seed),
        which a comparison of text-encoder choices must not read as their effect. Each image is encoded and decoded
        alone under ``fidelity.autocast``, as ``module.sample`` decodes: what fits in generation fits here.
        """
        vae, device = module.evaluation_parts().vae, module.device
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        extractors = {name: self.extractor(name).to(device) for name in self.extractor_names}
        distances = {}
        for name in extractors:
            distances[name] = FrechetDistance(references[name].statistics.feature_sum.numel(), sync_on_compute=False)
            distances[name].load_reference(references[name].statistics)
        for images in self.real_image_batches():
            decoded = []
            for image in images.to(device):
                with autocast:
                    latent = vae.encode((image[None] * 2 - 1).to(vae.dtype)).latent_dist.mode()
                    decoded.append(vae.decode(latent).sample.float())
            reconstructions = (torch.cat(decoded) / 2 + 0.5).clamp(0, 1)  # as the pipeline post-processes its images
            for name, extractor in extractors.items():
                distances[name].update(extractor(reconstructions), real=False)
        return {name: float(distance.compute()) for name, distance in distances.items()}

    def build_metrics(self, references: Mapping[str, ReferenceStatistics] | None) -> FidelityMetrics:
        """Metrics for this evaluation; pass the references on exactly one process (the sync sums statistics)."""
        metrics = FidelityMetrics(
            [self.extractor(name) for name in self.extractor_names],
            self.extractor(self.settings.classifier),
            self.num_images,
            measure_diversity=bool(self.diversity_prompts),
        )
        if references is not None:
            metrics.load_reference({name: reference.statistics for name, reference in references.items()})
        return metrics

    def generate(self, module: LatentDiffusionModule, prompts: list[str], seed: int) -> torch.Tensor:
        """``module.sample`` with this evaluation's steps, guidance and precision (``fidelity.autocast``: the
        networks under autocast, the DDIM latents float32, the VAE decoding one image at a time), on its device."""
        images = module.sample(
            prompts, self.num_inference_steps, self.settings.guidance_scale, seed, autocast_dtype=self.autocast_dtype
        )
        return images.float().to(module.device)

    def update_share(
        self,
        module: LatentDiffusionModule,
        metrics: FidelityMetrics,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> FidelityResult:
        """Generate this process's share of images once and feed them to every metric (no sync: local work).

        Returns the first generated images and prompts (for a grid); ``metrics`` stay to be computed.
        """
        settings, batch_size = self.settings, self.settings.batch_size
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
                images = self.generate(module, prompts, settings.seed + number)
                metrics.update(images, self.targets[chosen], torch.arange(chosen.start, chosen.stop))
                if number == 0:
                    samples, sample_captions = images[:SAMPLE_GRID_IMAGES].cpu(), prompts[:SAMPLE_GRID_IMAGES]
            else:
                prompts = [self.diversity_prompts[number]] * settings.diversity.images_per_prompt
                metrics.update_diversity(self.generate(module, prompts, settings.seed + DIVERSITY_SEED_OFFSET + number))
        return FidelityResult({}, samples, sample_captions)

    def evaluate(
        self, module: LatentDiffusionModule, metrics: FidelityMetrics, progress: bool = False
    ) -> FidelityResult:
        """All M images on this one process, and the metrics (``evaluate.py``; in training ``FIDCallback`` shares
        the images out with ``update_share`` and lets the processes agree before they sync)."""
        return replace(self.update_share(module, metrics, progress=progress), metrics=metrics.compute())


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
    parser.add_argument(
        "--extractors",
        type=extractor_list,
        help=f"comma-separated FID features from {','.join(EXTRACTORS)}, one FID each from the same images, "
        "e.g. inception,xrv (default: fidelity.extractors)",
    )
    add_device_argument(parser)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=... fidelity.seed=1")
    parser.set_defaults(run=run_fidelity)


def extractor_list(text: str) -> list[str]:
    """``--extractors inception,xrv``: one value, so trailing ``key=value`` overrides are not taken for names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXTRACTORS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {','.join(EXTRACTORS)}, got '{text}'")
    return names


def run_fidelity(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.num_images is not None:
        overrides.append(f"fidelity.num_images={args.num_images}")
    if args.extractors is not None:
        overrides.append(f"fidelity.extractors=[{','.join(args.extractors)}]")
    started = time.perf_counter()
    module, cfg = load_diffusion_module(args.model, overrides)
    module.to(args.device)
    root = resolve_data_root(cfg.data)
    evaluation = FidelityEvaluation(cfg, root, cfg.fidelity.num_images)
    references = evaluation.reference(args.device)
    result = evaluation.evaluate(module, evaluation.build_metrics(references), progress=True)
    summary = {
        "model": str(args.model),
        "metrics": result.metrics,
        "real_halves_fid": {
            name: None if math.isnan(reference.real_halves_fid) else reference.real_halves_fid
            for name, reference in references.items()
        },
        "autoencoder_floor_fid": {},
        "autoencoder_floor_missing": "not measured: the evaluation stopped before it",
        "num_images": evaluation.num_images,
        "extractors": list(evaluation.extractor_names),
        "classifier": cfg.fidelity.classifier,
        "autocast": cfg.fidelity.autocast,
        "device": str(args.device),
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
    write_summary(args.out, summary, result)  # the FID is on disk before the optional floor can fail
    print(f"[fidelity] {json.dumps(result.metrics)}\n[fidelity] written to {args.out}")
    summary |= measure_floor(evaluation, module, references)
    write_summary(args.out, summary, result)
    return summary


def measure_floor(
    evaluation: FidelityEvaluation, module: LatentDiffusionModule, references: Mapping[str, ReferenceStatistics]
) -> dict:
    """The summary's floor entries: the values, or why they are missing (an error is logged with its traceback and
    the FID already written stays: an out-of-memory here must not lose the M generated images' metrics)."""
    try:
        floor = evaluation.autoencoder_floor(module, references)
    except Exception as error:  # noqa: BLE001 - logged, printed and written into the summary
        log.exception("fidelity: the autoencoder floor failed; the FID result stands without it")
        missing = f"failed: {type(error).__name__}: {error}"
        print(f"[fidelity] autoencoder floor: missing ({missing})")
        return {"autoencoder_floor_fid": {}, "autoencoder_floor_missing": missing}
    return {"autoencoder_floor_fid": floor, "autoencoder_floor_missing": None}


def write_summary(out_dir: Path, summary: dict, result: FidelityResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity.json").write_text(json.dumps(summary, indent=2))
    m = summary["num_images"]
    floor_missing = summary.get("autoencoder_floor_missing")
    halves = {
        name: "n/a (M < 4)" if value is None else f"{value:.4f}" for name, value in summary["real_halves_fid"].items()
    }
    lines = [
        f"# Fidelity of `{summary['model']}`",
        "",
        f"M = {m} prompts from the report captions of split `{summary['split']}` "
        f"({summary['num_inference_steps']} DDIM steps, guidance {summary['guidance_scale']}, seed {summary['seed']}); "
        f"FID features: {', '.join(f'`{name}`' for name in summary['extractors'])}, "
        f"agreement classifier: `{summary['classifier']}`; generation autocast: {summary['autocast'] or 'off'}, "
        f"on {summary['device']}.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in result.metrics.items()),
        *(
            f"| fid/{name}, real held-out set half vs half (floor at M/2 = {m // 2}) | {value} |"
            for name, value in halves.items()
        ),
        *(
            f"| fid/{name}, real held-out set vs its own VAE reconstructions (the autoencoder's floor at M) "
            f"| {value:.4f} |"
            for name, value in summary["autoencoder_floor_fid"].items()
        ),
        *(["", f"The autoencoder floor: missing ({floor_missing})."] if floor_missing else []),
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
