"""What phrase grounding costs per MS-CXR image-phrase pair: end to end, and for the localization metrics alone.

    python bench/grounding_cost.py                       # the default model (random weights), N=50 / K=40, CPU
    python bench/grounding_cost.py --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --pairs 32
    python bench/grounding_cost.py --map-sizes 64 256 512 grounding.batch_size=4      # any config override
    python bench/grounding_cost.py --quick               # seconds: 2 pairs, N=4 / K=2, maps at 64 and 128 px

1. End to end, at the model's resolution with the ``grounding.*`` protocol (N, K, layers, batch size): the loop
   ``evaluate.py grounding`` and the callbacks run (``evaluate_grounding``: read the pair, encode the X-ray, K UNet
   calls with attention capture, then the metrics) over P pairs of the MS-CXR split, after one warm-up pair. The
   metrics' share is timed inside ``PhraseGroundingMetrics.update``; the rest is image loading and heatmaps.
2. The metrics alone at image side R (default 64 and 512): each convention of ``metrics.grounding_conventions``
   (and all of them together, as ``PhraseGroundingMetrics.update`` runs them) on one heatmap at the latent side
   R/8 (SD's 8x VAE) against a box mask at R px, which is what SD-2 at 512 px hands it (a 64 x 64 map). Then the
   same 64 x 64 map against a 64 px mask: a pair with no upsampling. Median of repeats, with the budget
   (all conventions of one pair <= 50 ms for a 64 x 64 map) checked per row.

Without --model the default config's architecture is built with random weights (model.vae.pretrained=null unless
overridden): attention costs the same whatever the weights. On a busy machine use --threads 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/diffusers are imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from attention_capture import load_model

from datamodules.cxr_datamodule import resolve_data_root
from grounding.evaluation import evaluate_grounding, grounding_items, heatmap_settings
from metrics.grounding_conventions import CONVENTIONS, convention_scores
from metrics.grounding_metrics import PhraseGroundingMetrics

MS_CXR_PAIRS = 1162  # image-phrase pairs of MS-CXR v1.1.0 (all splits): what `evaluate.py grounding` scores
SD_VAE_FACTOR = 8
LATENT_64 = 64  # SD-2's latent side at 512 px
BUDGET_SECONDS = 0.050  # all conventions of one pair, for a 64 x 64 map


class TimedGroundingMetrics(PhraseGroundingMetrics):
    """``PhraseGroundingMetrics`` that adds the wall time of each ``update`` to ``seconds``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = 0.0

    def update(self, *args, **kwargs) -> None:
        started = time.perf_counter()
        super().update(*args, **kwargs)
        self.seconds += time.perf_counter() - started


def end_to_end(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    module, cfg = load_model(args.model, overrides)
    root = resolve_data_root(cfg.data)
    settings = heatmap_settings(cfg.grounding)
    split = cfg.grounding.split
    items = grounding_items(cfg.data.ms_cxr_csv, root, split, args.pairs + 1, cfg.grounding.invalid_boxes)
    if len(items) < 2:
        raise SystemExit(f"need at least 2 MS-CXR pairs in split '{split}' under {root}, found {len(items)}")
    warm_up, timed = items[:1], items[1:]
    thresholds, batch_size = tuple(cfg.grounding.thresholds), int(cfg.grounding.batch_size)
    conventions = tuple(cfg.grounding.conventions)
    resolution = int(cfg.data.resolution)

    def run(pairs) -> tuple[float, TimedGroundingMetrics]:
        metric = TimedGroundingMetrics(thresholds=thresholds, seed=settings.seed, conventions=conventions)
        started = time.perf_counter()
        evaluate_grounding(module, pairs, root, resolution, settings, metric, batch_size)
        return time.perf_counter() - started, metric

    run(warm_up)  # first calls allocate and pick kernels
    seconds, metric = run(timed)
    scored = int(metric.compute()["count"])
    if scored == 0:
        raise SystemExit("no pair could be scored (every box cropped away or every image unreadable)")
    per_pair, metrics_per_pair = seconds / scored, metric.seconds / scored
    layers = "all" if settings.layer_resolutions is None else list(settings.layer_resolutions)
    print(
        f"model: {args.model or cfg.model.pretrained or 'the config architecture, random weights'}, {resolution} px, "
        f"N={settings.num_inference_steps} / K={settings.last_k_steps}, layers {layers}, batch {batch_size}, "
        f"device {module.device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"end to end: {scored} pairs in {seconds:.3f} s: {per_pair:.4f} s/pair "
        f"(image loading + heatmaps {per_pair - metrics_per_pair:.4f} s/pair, metrics {metrics_per_pair:.4f} s/pair)"
    )
    print(f"all {MS_CXR_PAIRS} MS-CXR pairs at this cost: {MS_CXR_PAIRS * per_pair / 60:.1f} min")


def bump_heatmap(side: int, seed: int) -> torch.Tensor:
    """A smooth random map with a bright blob: what attention over a finding looks like, at ``side`` px."""
    generator = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(1, 1, side + 2, side + 2, generator=generator), 3, stride=1)[0, 0]
    grid = torch.linspace(0, 1, side)
    blob = torch.exp(-((grid[:, None] - 0.35) ** 2 + (grid[None, :] - 0.6) ** 2) / 0.02)
    return noise + 2 * blob


def box_mask(side: int) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[int(0.25 * side) : int(0.5 * side), int(0.45 * side) : int(0.75 * side)] = True
    return mask


def time_conventions(heatmap: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of ``convention_scores`` per convention and for all of them at once (shared work counted once)."""
    groups = {name: (name,) for name in CONVENTIONS} | {"all": tuple(CONVENTIONS)}
    medians = {}
    for label, conventions in groups.items():
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            convention_scores(heatmap, mask, conventions)
            seconds.append(time.perf_counter() - started)
        medians[label] = statistics.median(seconds)
    return medians


def metrics_alone(map_sizes: Sequence[int], repeats: int) -> None:
    pairs = [(max(1, side // SD_VAE_FACTOR), side) for side in map_sizes] + [(LATENT_64, LATENT_64)]
    for heatmap_side, side in pairs:
        medians = time_conventions(bump_heatmap(heatmap_side, seed=0), box_mask(side), repeats)
        each = ", ".join(f"{name} {seconds:.4f} s" for name, seconds in medians.items() if name != "all")
        verdict = ""
        if heatmap_side == LATENT_64:
            verdict = f"; budget {BUDGET_SECONDS:.3f} s: {'met' if medians['all'] <= BUDGET_SECONDS else 'NOT met'}"
        print(
            f"metrics alone, heatmap {heatmap_side} px -> mask {side} px ({side * side} values): {each}; "
            f"all {medians['all']:.4f} s/pair (median of {repeats}){verdict}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a run's .ckpt or a diffusers folder (default: the default config, random)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs timed end to end (after one warm-up pair)")
    parser.add_argument("--map-sizes", type=int, nargs="+", default=[64, 512], help="mask sides for the metrics")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each metrics-alone measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 pairs, N=4 / K=2, maps at 64 and 128 px, 1 repeat")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. grounding.batch_size=4")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.quick:
        args.pairs, args.map_sizes, args.repeats = 2, [64, 128], 1
        overrides = ["grounding.num_inference_steps=4", "grounding.last_k_steps=2", "grounding.split=null", *overrides]
    end_to_end(args, overrides)
    metrics_alone(args.map_sizes, args.repeats)


if __name__ == "__main__":
    main()
