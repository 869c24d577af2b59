r"""Phrase-grounding evaluation over an MS-CXR CSV and a MIMIC-CXR-JPG image root, in training and after it.

``evaluate_grounding`` is the one loop both the in-training callbacks and ``evaluate.py grounding`` run:
items → model-resolution samples → phrase-grounding heatmaps → ``PhraseGroundingMetrics`` (synced across
processes), batch by batch, so memory stays flat in the number of items. The command line::

    python evaluate.py grounding --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --out eval/grounding
    python evaluate.py grounding --model /models/sd2-cxr-pipeline --ms-cxr /data/MS_CXR_Local_Alignment_v1.1.0.csv \
        --data-root /data/mimic-cxr-jpg/2.1.0 --split test --heatmaps --out eval/sd2 grounding.batch_size=16

writes ``per_sample.csv`` (one row per pair; a rerun skips the rows already there), ``summary.json`` and
``summary.md`` (which pairs, then overall and per category), and with ``--heatmaps`` one PNG per pair (the X-ray
and the heatmap overlay, boxes outlined). ``--pairs`` chooses the pair set (``datamodules.mscxr.PAIR_SETS``): one
per image and phrase (default), or ``reference``, the image–finding rows the paper's code scored. Trailing
``key=value`` arguments override the model's config (``grounding.*`` sets N, K, layers, thresholds, seed, batch
size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from tqdm import tqdm

from datamodules.cxr_datamodule import resolve_data_root
from datamodules.mscxr import (
    PAIR_SET_DESCRIPTIONS,
    PAIR_SETS,
    GroundingItem,
    InvalidBoxPolicy,
    PairSet,
    load_grounding_sample,
    read_ms_cxr,
)
from datamodules.skips import SKIP_CROPPED_AWAY, SkipLedger, SkippedSample, describe_skips
from datamodules.synthetic import MS_CXR_FILE
from datamodules.transforms import UnreadableImageError
from grounding.phrase_grounding import HeatmapSettings, phrase_grounding_heatmaps
from lightning_modules.devices import add_device_argument
from lightning_modules.loading import load_diffusion_module
from metrics.grounding_metrics import MS_CXR_CATEGORIES, PhraseGroundingMetrics
from metrics.localization import normalize_heatmap

if TYPE_CHECKING:
    from lightning_modules.latent_diffusion import LatentDiffusionModule

ITEM_COLUMNS = ("dicom_id", "category", "phrase", "num_boxes_dropped")
PER_SAMPLE_FILE = "per_sample.csv"
SETTINGS_FILE = "settings.json"
BOX_COLOUR = (0, 255, 0)


# --------------------------------------------------------------------------------------------- configuration
def heatmap_settings(grounding_cfg: DictConfig, **overrides: Any) -> HeatmapSettings:
    """``HeatmapSettings`` from the ``grounding`` config section; callbacks override N and K."""
    layers = grounding_cfg.layer_resolutions
    settings = HeatmapSettings(
        num_inference_steps=int(grounding_cfg.num_inference_steps),
        last_k_steps=int(grounding_cfg.last_k_steps),
        layer_resolutions=None if layers is None else tuple(int(side) for side in layers),
        resolution=grounding_cfg.heatmap_resolution,
        seed=int(grounding_cfg.seed),
    )
    return replace(settings, **overrides)


def resolve_ms_cxr_csv(ms_cxr_csv: str | Path | None, data_root: Path) -> Path:
    """``data.ms_cxr_csv``, or the MS-CXR v1.1.0 CSV at the data root (where the synthetic set keeps it)."""
    path = Path(ms_cxr_csv) if ms_cxr_csv else data_root / MS_CXR_FILE
    if not path.is_file():
        source = "data.ms_cxr_csv" if ms_cxr_csv else f"data.ms_cxr_csv=null (the data root's {MS_CXR_FILE})"
        raise FileNotFoundError(
            f"MS-CXR CSV {path} ({source}) does not exist: set data.ms_cxr_csv to the MS-CXR CSV, or turn "
            "the grounding callbacks off (callbacks.grounding.enabled=false, "
            "callbacks.attention_heatmaps.enabled=false)"
        )
    return path


def interleave_categories(items: Sequence[GroundingItem], limit: int | None = None) -> list[GroundingItem]:
    """The first ``limit`` items taking one category after another (each in CSV order), so a small panel
    covers every finding however the CSV is sorted. Deterministic: the same CSV gives the same panel."""
    by_category: dict[str, list[GroundingItem]] = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    rounds = itertools.zip_longest(*by_category.values())
    interleaved = [item for round_ in rounds for item in round_ if item is not None]
    return interleaved if limit is None else interleaved[:limit]


def grounding_items(
    ms_cxr_csv: str | Path | None,
    data_root: Path,
    split: str | None,
    limit: int | None = None,
    invalid_boxes: InvalidBoxPolicy = "error",
    skipped: SkipLedger | None = None,
    pairs: PairSet = "phrase",
    excluded: dict[str, list[str]] | None = None,
) -> list[GroundingItem]:
    """The pairs to evaluate: a split of the MS-CXR CSV, category-interleaved, at most ``limit``.

    ``invalid_boxes`` (``grounding.invalid_boxes``), ``skipped``, ``pairs`` (the pair set) and ``excluded``: see
    ``read_ms_cxr``."""
    csv_path = resolve_ms_cxr_csv(ms_cxr_csv, data_root)
    return interleave_categories(read_ms_cxr(csv_path, split, invalid_boxes, skipped, pairs, excluded), limit)


def grounding_item_id(item: GroundingItem) -> str:
    """How a skipped pair is named in logs and summaries."""
    return f"{item.dicom_id} / {item.phrase!r}"


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class GroundingBatch:
    """One batch of the evaluation: the items tried, the skipped ones (id and reason), and for the others
    sample, heatmap and scores."""

    items: list[GroundingItem]
    skipped: list[SkippedSample] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    heatmaps: torch.Tensor | None = None
    scores: list[dict[str, float]] = field(default_factory=list)


@contextmanager
def evaluation_weights(module: LatentDiffusionModule) -> Iterator[None]:
    """Eval mode and no autograd around code that uses ``module.evaluation_parts()`` (the EMA copies when kept;
    the training weights are never swapped); the training mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def evaluate_grounding(
    module: LatentDiffusionModule,
    items: Sequence[GroundingItem],
    data_root: Path,
    resolution: int,
    settings: HeatmapSettings,
    metric: PhraseGroundingMetrics,
    batch_size: int,
    on_batch: Callable[[GroundingBatch], None] | None = None,
) -> None:
    """Score every item's phrase-grounding heatmap into ``metric``; ``on_batch`` sees each batch as it is done.

    An item whose image is missing or undecodable, or whose boxes are all cropped away by the image transform,
    is skipped: it is in ``batch.skipped`` with its reason, not in ``batch.samples``. Nothing is kept between
    batches.
    """
    if batch_size < 1:
        raise ValueError(f"grounding.batch_size must be at least 1, got {batch_size}")
    with evaluation_weights(module):
        for start in range(0, len(items), batch_size):
            batch = GroundingBatch(list(items[start : start + batch_size]))
            for item in batch.items:
                try:
                    sample = load_grounding_sample(item, data_root, resolution)
                except UnreadableImageError as error:
                    batch.skipped.append(SkippedSample(grounding_item_id(item), error.reason))
                    continue
                if sample is None:
                    batch.skipped.append(SkippedSample(grounding_item_id(item), SKIP_CROPPED_AWAY))
                else:
                    batch.samples.append(sample)
            if batch.samples:
                categories = [sample["category"] for sample in batch.samples]
                batch.heatmaps = phrase_grounding_heatmaps(
                    module,
                    torch.stack([sample["pixel_values"] for sample in batch.samples]),
                    [sample["phrase"] for sample in batch.samples],
                    categories,
                    settings,
                    image_ids=[sample["dicom_id"] for sample in batch.samples],
                ).cpu()
                metric.update(batch.heatmaps, [sample["mask"] for sample in batch.samples], categories)
                batch.scores = metric.latest_sample_scores
            if on_batch is not None:
                on_batch(batch)


def sample_rows(batch: GroundingBatch) -> list[dict[str, Any]]:
    """Per-sample result rows: the item's identity and its scores."""
    return [
        {**{column: sample[column] for column in ITEM_COLUMNS}, **scores}
        for sample, scores in zip(batch.samples, batch.scores, strict=True)
    ]


# --------------------------------------------------------------------------------------------- pictures
def grounding_tiles(pixel_values: torch.Tensor, heatmap: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(2, 3, size, size) in [0, 1]: the X-ray, and the min-max normalised heatmap over it (black-red-yellow-
    white ramp, more opaque where hotter); the ground-truth boxes (x, y, w, h in image pixels) outlined on both."""
    xray = ((pixel_values.detach().float().cpu().mean(dim=0) + 1) / 2).clamp(0, 1)
    xray = F.interpolate(xray[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    heat = normalize_heatmap(heatmap.detach().float().cpu()).float()
    heat = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    ramp = torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)])
    opacity = 0.7 * heat  # cold regions leave the X-ray visible
    tiles = [xray.expand(3, -1, -1), (1 - opacity) * xray + opacity * ramp]
    scale = size / pixel_values.shape[-1]
    outlined = []
    for tile in tiles:
        image = Image.fromarray((tile.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for x, y, w, h in boxes.tolist():
            draw.rectangle(
                (x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1), outline=BOX_COLOUR, width=1
            )
        outlined.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(outlined)


CAPTION_LABELS = {"iou": "IoU", "miou": "mIoU", "auc": "AUC", "cnr": "CNR", "pointing": "hit"}


def score_caption(scores: dict[str, float], convention: str) -> str:
    """One line of a pair's scores under one convention, as a heatmap label (mIoU only where there is no IoU)."""
    values = {
        metric: scores[f"{convention}/{metric}"] for metric in CAPTION_LABELS if f"{convention}/{metric}" in scores
    }
    if "iou" in values:
        values.pop("miou", None)
    return " ".join(
        f"{CAPTION_LABELS[metric]} {value:{'.0f' if metric == 'pointing' else '.2f'}}"
        for metric, value in values.items()
    )


def _heatmap_file_name(sample: dict[str, Any]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", sample["phrase"].lower()).strip("-")[:48]
    return f"{sample['dicom_id']}_{slug}.png"


# --------------------------------------------------------------------------------------------- summaries
def summarize(rows: pd.DataFrame, metric_names: Sequence[str]) -> dict[str, Any]:
    """Means over samples, overall and per category, NaN scores left out (as ``PhraseGroundingMetrics``), and the
    mean over categories ("macro")."""

    def means(table: pd.DataFrame) -> dict[str, float | None]:
        values = table[list(metric_names)].astype(float).mean()
        return {name: None if math.isnan(value) else float(value) for name, value in values.items()}

    per_category = {
        category: {"count": int((rows["category"] == category).sum()), **means(rows[rows["category"] == category])}
        for category in MS_CXR_CATEGORIES
        if (rows["category"] == category).any()
    }
    macro = means(pd.DataFrame([values for values in per_category.values()], columns=list(metric_names)))
    return {"count": len(rows), "overall": means(rows), "macro": macro, "per_category": per_category}


def _by_convention(metric_names: Sequence[str]) -> dict[str, list[str]]:
    """ "paper_code/iou", ... grouped as {"paper_code": ["iou", ...], ...}, in order."""
    groups: dict[str, list[str]] = {}
    for name in metric_names:
        convention, metric = name.split("/", 1)
        groups.setdefault(convention, []).append(metric)
    return groups


def markdown_table(summary: dict[str, Any], metric_names: Sequence[str]) -> str:
    """The summary as markdown: the conventions side by side (mean over pairs, and over categories), then one
    table per convention with a row per category."""

    def cell(values: dict[str, Any], name: str) -> str:
        return "" if name not in values else "n/a" if values[name] is None else f"{values[name]:.3f}"

    groups = _by_convention(metric_names)
    columns = list(dict.fromkeys(metric for metrics in groups.values() for metric in metrics))
    lines = [
        f"| convention | mean over | {' | '.join(columns)} |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for convention in groups:
        for label, values in ((f"{summary['count']} pairs", summary["overall"]), ("categories", summary["macro"])):
            cells = " | ".join(cell(values, f"{convention}/{metric}") for metric in columns)
            lines.append(f"| {convention} | {label} | {cells} |")
    for convention, metrics in groups.items():
        names = [f"{convention}/{metric}" for metric in metrics]
        lines += [
            "",
            f"{convention}:",
            "",
            f"| category | n | {' | '.join(metrics)} |",
            "|---|---:|" + "---:|" * len(metrics),
            f"| **all** | {summary['count']} | {' | '.join(cell(summary['overall'], name) for name in names)} |",
        ]
        for category, values in summary["per_category"].items():
            lines.append(f"| {category} | {values['count']} | {' | '.join(cell(values, name) for name in names)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- command line
def register(subcommands: argparse._SubParsersAction) -> None:
    """Add ``evaluate.py grounding``."""
    parser = subcommands.add_parser(
        "grounding",
        help="phrase grounding on MS-CXR: per-sample CSV, summary table, heatmaps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a run's .ckpt file or a diffusers pipeline folder")
    parser.add_argument("--ms-cxr", help="MS-CXR CSV (default: the model config's data.ms_cxr_csv)")
    parser.add_argument("--data-root", help="MIMIC-CXR-JPG root holding the images (default: the config's data root)")
    parser.add_argument(
        "--split",
        choices=["test", "val", "train", "all"],
        help="MS-CXR v1.1.0 split; all = every row, as v1.0.0 (no split column) was evaluated "
        "(default: the config's grounding.split, test)",
    )
    parser.add_argument(
        "--pairs",
        choices=PAIR_SETS,
        default="phrase",
        help="phrase: one pair per image and phrase (default); reference: one per image and finding, filtered as "
        "MischaD/chest-distillation scored MS-CXR for its published rows (like for like with them on --split all "
        "and the v1.0.0 CSV)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    parser.add_argument("--out", required=True, help="output folder; rerunning into it resumes")
    parser.add_argument("--heatmaps", action="store_true", help="also write one heatmap PNG per pair")
    add_device_argument(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. grounding.num_inference_steps=20")
    parser.set_defaults(run=run_grounding_evaluation)


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """A rerun may only resume an evaluation with the same model, data and settings."""
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        previous.setdefault("pairs", "phrase")  # written before --pairs existed: the only pair set then
        if previous != settings:
            changed = sorted(key for key in settings.keys() | previous.keys() if previous.get(key) != settings.get(key))
            raise ValueError(
                f"{out_dir} holds results of a different evaluation ({', '.join(changed)} differ; see {path}); "
                "use another --out folder"
            )
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _read_rows(per_sample_csv: Path) -> pd.DataFrame:
    return pd.read_csv(per_sample_csv, dtype={"dicom_id": str, "category": str, "phrase": str})


def _row_keys(rows: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(dicom_id, category, phrase): unique in every pair set (one phrase may name two findings of one image)."""
    return list(zip(rows["dicom_id"], rows["category"], rows["phrase"], strict=True))


def _item_key(item: GroundingItem) -> tuple[str, str, str]:
    return item.dicom_id, item.category, item.phrase


def pair_set_caption(summary: dict[str, Any]) -> str:
    """One markdown line saying which split and pairs a summary covers, and how many the pair set left out, why."""
    pairs, split = summary["pairs"], summary["settings"]["split"] or "all"
    left_out = "".join(f"; {count} left out: {reason}" for reason, count in pairs["excluded"].items())
    return f"Split `{split}`, pairs `{pairs['set']}`: {pairs['description']}{left_out}.\n"


def run_grounding_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """The ``grounding`` subcommand on ``args.device`` (model, images, heatmaps); returns the summary it writes."""
    module, cfg = load_diffusion_module(args.model, args.overrides)
    module.to(args.device)
    data_root = Path(args.data_root) if args.data_root else resolve_data_root(cfg.data)
    ms_cxr_csv = resolve_ms_cxr_csv(args.ms_cxr or cfg.data.ms_cxr_csv, data_root)
    split = cfg.grounding.split if args.split is None else None if args.split == "all" else args.split
    skipped = SkipLedger()  # rows the CSV reader left out, then pairs the loop could not score
    excluded: dict[str, list[str]] = {}  # pairs the pair set leaves out by definition (not bad data)
    items = grounding_items(
        ms_cxr_csv, data_root, split, args.limit, cfg.grounding.invalid_boxes, skipped, args.pairs, excluded
    )
    settings = heatmap_settings(cfg.grounding)
    thresholds = tuple(float(t) for t in cfg.grounding.thresholds)
    conventions = tuple(cfg.grounding.conventions)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(Path(args.model).resolve()),
        "ms_cxr_csv": str(ms_cxr_csv.resolve()),
        "data_root": str(data_root.resolve()),
        "split": split,
        "pairs": args.pairs,
        "resolution": int(cfg.data.resolution),
        "heatmap_settings": asdict(settings),
        "thresholds": thresholds,
        "conventions": conventions,
    }
    _check_settings(out_dir, json.loads(json.dumps(record)))  # as read back from JSON: tuples become lists
    metric = PhraseGroundingMetrics(thresholds=thresholds, seed=settings.seed, conventions=conventions)
    per_sample_csv = out_dir / PER_SAMPLE_FILE
    if not per_sample_csv.is_file():
        pd.DataFrame(columns=[*ITEM_COLUMNS, *metric.metric_names]).to_csv(per_sample_csv, index=False)
    done = set(_row_keys(_read_rows(per_sample_csv)))
    remaining = [item for item in items if _item_key(item) not in done]
    heatmap_dir = out_dir / "heatmaps"
    progress = tqdm(total=len(remaining), desc="grounding", unit="pair", disable=None)

    def write_batch(batch: GroundingBatch) -> None:
        skipped.add(batch.skipped)
        rows = pd.DataFrame(sample_rows(batch), columns=[*ITEM_COLUMNS, *metric.metric_names])
        rows.to_csv(per_sample_csv, mode="a", header=False, index=False)
        if args.heatmaps:
            heatmap_dir.mkdir(exist_ok=True)
            for sample, heatmap in zip(batch.samples, batch.heatmaps if batch.samples else [], strict=True):
                tiles = grounding_tiles(sample["pixel_values"], heatmap, sample["boxes"], size=256)
                pixels = (torch.cat(list(tiles), dim=-1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(heatmap_dir / _heatmap_file_name(sample))
        progress.update(len(batch.items))

    done_before = len(items) - len(remaining)
    print(
        f"[grounding] {len(items)} pairs ({args.pairs}) of {ms_cxr_csv} (split {split or 'all'}), "
        f"{sum(map(len, excluded.values()))} left out by the pair set, {done_before} done before, "
        f"on {args.device}"
    )
    resolution, batch_size = int(cfg.data.resolution), int(cfg.grounding.batch_size)
    evaluate_grounding(module, remaining, data_root, resolution, settings, metric, batch_size, write_batch)
    progress.close()

    selected = {_item_key(item) for item in items}
    all_rows = _read_rows(per_sample_csv)
    all_rows = all_rows[[key in selected for key in _row_keys(all_rows)]]
    summary = {
        "pairs": {
            "set": args.pairs,
            "description": PAIR_SET_DESCRIPTIONS[args.pairs],
            "excluded": {reason: len(ids) for reason, ids in excluded.items()},
            "excluded_ids": excluded,
        },
        **summarize(all_rows, metric.metric_names),
        "skipped_pairs": len(skipped),
        "skipped": skipped.counts(),
        "skipped_ids": skipped.state_dict(),
        "device": str(args.device),
        "settings": json.loads((out_dir / SETTINGS_FILE).read_text()),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = pair_set_caption(summary) + "\n" + markdown_table(summary, metric.metric_names)
    (out_dir / "summary.md").write_text(table)
    print(table)
    if len(skipped):
        print(f"[grounding] skipped: {describe_skips(skipped.counts())}")
        for sample_id, reason in skipped:
            print(f"  {sample_id}: {reason}")
    print(f"[grounding] results in {out_dir}")
    return summary
