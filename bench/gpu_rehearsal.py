"""Ready for a GPU: SD-2 base at 512 px in bf16 on cached latents, at the largest batch that fits; images/s per GPU.

    python bench/gpu_rehearsal.py                          # on a GPU machine: SD-2 base shape, 512 px
    python bench/gpu_rehearsal.py --gradient-checkpointing --variant learnable
    python bench/gpu_rehearsal.py --quick                  # anywhere, CPU included: tiny widths, 64 px, seconds

The model is SD-2 base's architecture with random weights (``bench/sd2_shape.py``; nothing is downloaded), loaded
by the project as ``train.py`` does and trained by a ``lightning.Trainer`` in ``bf16-mixed`` (the project's
training_step, AdamW, EMA, gradient clipping). Training batches are cached latents: random posteriors of SD-2's
latent shape (``latent_moments``, 8 x 64 x 64 at 512 px) through the module's ``batch_latents``, as shards written
by ``datamodules.prepare --latents`` give them, so the VAE encoder never runs. The batch doubles from 1 until it
runs out of GPU memory (or reaches --max-batch-size); each batch size trains --warmup-steps untimed steps, then
--steps timed ones. Then: grounding seconds per pair (``phrase_grounding_heatmaps`` with N = 50 / K = 40 and the
localization metrics) and FID images/s (``module.sample`` with 75 DDIM steps and guidance 4, then features in
``FidelityMetrics``), each after one warm-up call.

Anchor: MosaicML trained SD-2 at 512 px on precomputed latents at about 36 images/s per A100; the goal here is at
least 100 images/s per H100/H200. Model TFLOP/s and MFU come from the meta-device FLOPs of one training step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import gc
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import real_shape_rehearsal as rehearsal
import sd2_shape
import torch
from sd2_shape import PeakMemory
from train_throughput import fill_from_preset

from lightning_modules.latent_diffusion import LatentDiffusionModule

ANCHOR_IMAGES_PER_S = 36.0  # MosaicML, SD-2 at 512 px with precomputed latents, per A100
GOAL_IMAGES_PER_S = 100.0  # per H100/H200
BF16_PEAK = {"A100": 312e12, "H100 SXM": 989e12, "H200": 989e12}  # dense tensor-core FLOP/s
FULL = {
    "shape": sd2_shape.SD2,
    "resolution": 512,
    "max_batch_size": 1024,
    "steps": 5,
    "warmup_steps": 2,
    "grounding_pairs": 8,
    "fid_images": 8,
    "fid_steps": rehearsal.PAPER["fid_steps"],
}
QUICK = FULL | {
    "shape": sd2_shape.TINY,
    "resolution": 64,
    "max_batch_size": 4,
    "steps": 2,
    "warmup_steps": 1,
    "grounding_pairs": 2,
    "fid_images": 2,
    "fid_steps": 2,
}
GIB = 2**30


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny widths, real structure, CPU is fine: {QUICK}")
    parser.add_argument("--resolution", type=int, help=f"image side in px (default {FULL['resolution']})")
    parser.add_argument("--max-batch-size", type=int, help="stop doubling here (default: until out of memory)")
    parser.add_argument("--steps", type=int, help=f"timed steps per batch size (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    parser.add_argument("--variant", choices=sorted(sd2_shape.VARIANTS), default="frozen")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--grounding-pairs", type=int, help=f"pairs in one grounding batch ({FULL['grounding_pairs']})")
    parser.add_argument("--fid-images", type=int, help=f"images in one FID generation batch ({FULL['fid_images']})")
    parser.add_argument("--fid-steps", type=int, help=f"DDIM steps (default: the paper's {FULL['fid_steps']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.shape = preset["shape"]
    sizes = ("resolution", "max_batch_size", "steps", "warmup_steps", "grounding_pairs", "fid_images", "fid_steps")
    fill_from_preset(args, preset, sizes)
    if min(getattr(args, key) for key in sizes) < 1:
        parser.error("sizes and step counts must be at least 1")
    return args


@dataclass
class BatchResult:
    batch_size: int
    images_per_second: float | None  # None: out of memory
    peak_bytes: int


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_training_memory(module: LatentDiffusionModule, device: torch.device) -> None:
    """Gradients left by the last step and the finished Trainer's optimizer state go before the next batch size."""
    module.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_throughput(module: LatentDiffusionModule, cfg, batch_size: int, args: argparse.Namespace) -> BatchResult:
    memory = PeakMemory(module.device)
    free_training_memory(module, module.device)
    memory.reset()
    count = args.warmup_steps + args.steps
    batches = rehearsal.training_batches(count, batch_size, args.resolution, cached_latents=True)
    try:
        seconds = rehearsal.train_steps(module, cfg, batches)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not out_of_memory(error):
            raise
        free_training_memory(module, module.device)
        return BatchResult(batch_size, None, memory.peak_bytes())
    timed = sum(seconds[args.warmup_steps :])
    return BatchResult(batch_size, batch_size * args.steps / timed, memory.peak_bytes())


def doubling_batch_sizes(measure: Callable[[int], BatchResult], max_batch_size: int) -> list[BatchResult]:
    """Batch 1, 2, 4, ... up to ``max_batch_size`` or the first that runs out of memory (its result is last)."""
    results, batch_size = [], 1
    while batch_size <= max_batch_size:
        results.append(measure(batch_size))
        if results[-1].images_per_second is None:
            break
        batch_size *= 2
    return results


def timed_after_warmup(device: torch.device, run, warmup) -> tuple[float, int]:
    """Seconds and peak memory of ``run()`` after one ``warmup()`` call (kernel selection, allocator growth)."""
    warmup()
    memory = PeakMemory(device)
    gc.collect()
    memory.reset()
    start = sd2_shape.clock(device)
    run()
    return sd2_shape.clock(device) - start, memory.peak_bytes()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sd2_shape.quiet_process(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory(prefix="sd2-shape-") as scratch:
        folder = sd2_shape.write_pipeline(sd2_shape.build_parts(args.shape, args.resolution), Path(scratch) / "p")
        overrides = sd2_shape.config_overrides(folder, args.resolution, 1, args.gradient_checkpointing)
        module, cfg = sd2_shape.load_module(folder, args.variant, overrides)
        module = module.to(device)
        extractor = rehearsal.random_domain_extractor(Path(scratch) / "domain")
        print(
            f"model: {args.shape.name}, random weights, variant {args.variant} (trains "
            f"{'+'.join(module.trainable)}), {args.resolution} px, bf16-mixed, cached latents, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; device: {name}; "
            f"memory: {PeakMemory(device).what}"
        )

        results = doubling_batch_sizes(partial(training_throughput, module, cfg, args=args), args.max_batch_size)
        free_training_memory(module, device)

        module.eval()
        pairs, resolution = args.grounding_pairs, args.resolution
        grounding_seconds, grounding_peak = timed_after_warmup(
            device,
            partial(rehearsal.grounding_evaluation, module, pairs, resolution),
            partial(rehearsal.grounding_evaluation, module, 1, resolution),
        )
        fid_seconds, fid_peak = timed_after_warmup(
            device,
            partial(rehearsal.fid_update, module, extractor, args.fid_images, args.fid_steps),
            partial(rehearsal.fid_update, module, extractor, 1, 1),
        )

    step_flops = rehearsal.meta_training_flops(
        args.shape, resolution, 1, args.variant, args.gradient_checkpointing, cached_latents=True
    )
    print("\n## Training throughput by batch size\n")
    print("| batch | images/s | peak memory GiB | model TFLOP/s |")
    print("|---:|---:|---:|---:|")
    for result in results:
        if result.images_per_second is None:
            print(f"| {result.batch_size} | out of memory | {result.peak_bytes / GIB:.2f} | - |")
        else:
            rate, tflops = result.images_per_second, result.images_per_second * step_flops / 1e12
            print(f"| {result.batch_size} | {rate:.2f} | {result.peak_bytes / GIB:.2f} | {tflops:.2f} |")
    fitted = [result for result in results if result.images_per_second is not None]
    if not fitted:
        raise SystemExit("not even batch 1 fits in memory")
    best = max(fitted, key=lambda result: result.images_per_second)
    largest = fitted[-1]
    mfu = ", ".join(f"{gpu} {best.images_per_second * step_flops / peak:.1%}" for gpu, peak in BF16_PEAK.items())
    print(
        f"\nlargest batch that fits: {largest.batch_size} ({largest.peak_bytes / GIB:.2f} GiB peak"
        f"{'' if len(fitted) < len(results) else f'; --max-batch-size {args.max_batch_size} reached, no OOM'})"
        f"\nbest training throughput: {best.images_per_second:.2f} images/s per device at batch {best.batch_size} "
        f"({step_flops / 1e9:.1f} GFLOP per image; MFU against the bf16 dense peak of {mfu})"
        f"\ngrounding: {grounding_seconds / pairs:.3f} s per pair ({pairs} pairs in one batch, "
        f"N={rehearsal.GROUNDING.num_inference_steps}, K={rehearsal.GROUNDING.last_k_steps}, metrics included; "
        f"{grounding_peak / GIB:.2f} GiB peak)"
        f"\nFID: {args.fid_images / fid_seconds:.3f} images/s ({args.fid_images} images, {args.fid_steps} DDIM steps, "
        f"guidance {rehearsal.PAPER['guidance']:g}, domain extractor; {fid_peak / GIB:.2f} GiB peak)"
        f"\nanchor: MosaicML SD-2 512 px, precomputed latents: {ANCHOR_IMAGES_PER_S:.0f} images/s per A100; "
        f"ours / anchor = {best.images_per_second / ANCHOR_IMAGES_PER_S:.3f}"
        f"\ngoal: >= {GOAL_IMAGES_PER_S:.0f} images/s per H100/H200; "
        f"ours / goal = {best.images_per_second / GOAL_IMAGES_PER_S:.3f}"
    )


if __name__ == "__main__":
    main()
