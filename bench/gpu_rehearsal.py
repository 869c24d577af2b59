"""Ready for a GPU: SD-2 base or PixArt-Σ 512 at 512 px in bf16 on cached latents, at the largest batch that fits;
images/s per GPU.

    python bench/gpu_rehearsal.py                          # on a GPU machine: SD-2 base shape, 512 px, < 8 min
    python bench/gpu_rehearsal.py --gradient-checkpointing --variant learnable
    python bench/gpu_rehearsal.py --backbone pixart --gradient-checkpointing   # PixArt-Σ 512 + T5-XXL, < 9 min
    python bench/gpu_rehearsal.py --quick --device cpu     # anywhere: tiny widths, 64 px, about a minute
    python bench/gpu_rehearsal.py --backbone pixart --quick --device cpu

The model is SD-2 base's or PixArt-Σ 512's architecture with random weights (``bench/sd2_shape.py``,
``bench/pixart_shape.py``: each part's published parameter count; nothing is downloaded), loaded by the project as
``train.py`` does and trained by a ``lightning.Trainer`` in ``bf16-mixed`` (the project's training_step, AdamW,
EMA, gradient clipping). Training data are cached latents: random posteriors of the VAE's latent shape
(``latent_moments``, 8 x 64 x 64 at 512 px for both), held in host memory one sample per item and collated
every step by the project's ``collate_skipping_bad``, as the shard loader's samples are (reading the shards is
``bench/data_throughput.py``'s measurement), so the VAE encoder never runs. The batch doubles from 1 until it runs
out of memory, reaches --max-batch-size, or the next batch (forecast at twice the last one's wall time) would end
past --search-budget-s; each batch size trains --warmup-steps untimed steps, then --steps timed ones. Then:
grounding seconds per pair (``phrase_grounding_heatmaps`` with N = 50 / K = 40 and the localization metrics) and
FID images/s (``module.sample`` with 75 steps of the backbone's sampler and guidance 4, then features in
``FidelityMetrics``), each after one warm-up call. PixArt-Σ's T5-XXL is frozen and fp32 by default, as the project
holds it (19 GB; ``--text-encoder-weights bf16`` halves it and allows the frozen variant only); the learnable
variant trains it in full, which needs ~100 GiB of fixed state (``bench/training_memory.py --backbone pixart``): an
H200, not an 80 GB GPU.

Every phase runs on --device (default: CUDA when there is one). Lightning's own strategy teardown moves the module
and its optimizer state to the CPU at the end of every ``Trainer.fit``, out-of-memory included, so from the second
batch size on the peak memory would be the host's and grounding and FID would run on the CPU; here the Trainer's
strategy (``KeepOnDevice``) leaves the module in place and drops the optimizer state instead. Every phase (each
batch size, grounding, FID) checks at its start and end that every parameter and buffer is on the requested
device (``assert_on_device``), and stops the run naming the first one that is not. Each phase starts from a reset
peak-memory counter, after the freed memory went back to the device (``torch.cuda.empty_cache``).

Two rates per batch size: step only (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, AdamW,
EMA) and end to end (the timed steps' whole window: fetching and collating the batch, the host-to-device copy,
the step and Lightning's hooks). Model TFLOP/s and MFU use the FLOPs of one training step without recomputation;
hardware TFLOP/s and HFU those the device executes (gradient checkpointing's recomputed forward included); both
counted on the meta device (``real_shape_rehearsal.meta_training_flops``) and divided by the end-to-end time and
the GPU's dense bf16 peak (``sd2_shape.BF16_DENSE_PEAK``, by device name, or --peak-tflops).

Anchor (SD-2 only): MosaicML trained SD-2 at 512 px on precomputed latents at about 36 images/s per A100; the goal
here is at least 100 images/s per H100/H200. PixArt-Σ has no published fine-tuning throughput to anchor on; its
step costs ~2.7x SD-2's FLOPs (T5-XXL encodes 300 tokens per caption every step: text features are not cached
here). Time budget: the default run on one H100 is meant to end within 8 minutes for SD-2, 9 for PixArt-Σ
(``PHASE_BUDGET_S``, from the FLOP counts: the rehearsal has not run on a GPU yet); each phase prints its time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import gc
import itertools
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import real_shape_rehearsal as rehearsal
import sd2_shape
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from sd2_shape import PeakMemory, StepClock, clock
from torch.utils.data import DataLoader
from train_throughput import SteadyStateClock, fill_from_preset, lightning_trainer

from datamodules.mimic import collate_skipping_bad
from lightning_modules.devices import add_device_argument
from lightning_modules.latent_diffusion import LatentDiffusionModule

Result = TypeVar("Result")
ANCHOR_IMAGES_PER_S = 36.0  # MosaicML, SD-2 at 512 px with precomputed latents, per A100
GOAL_IMAGES_PER_S = 100.0  # per H100/H200
FULL = {
    "resolution": 512,
    "max_batch_size": 1024,
    "steps": 5,
    "warmup_steps": 2,
    "grounding_pairs": 8,
    "fid_images": 8,
    "fid_steps": rehearsal.PAPER["fid_steps"],
    "search_budget_s": 180.0,
}
QUICK = FULL | {
    "resolution": 64,
    "max_batch_size": 4,
    "steps": 2,
    "warmup_steps": 1,
    "grounding_pairs": 2,
    "fid_images": 2,
    "fid_steps": 2,
    "search_budget_s": 600.0,
}
# Seconds per phase of the default run on one H100 (imports included: 8 minutes for SD-2, 9 for PixArt-Σ). Set-up:
# the random model is built on the CPU and written as a diffusers folder, then loaded: 5.2 GB for SD-2, 21.9 GB
# for PixArt-Σ (T5-XXL 19.0 GB in fp32). Batch search: bf16 peak x ~40 % gives ~0.1 s per batch-16 SD-2 step (2.45
# TFLOP per image; PixArt-Σ 6.7 with T5-XXL's 2.8 per caption); Trainer start-up and AdamW's first allocation
# dominate. Grounding: 8 pairs x 33 / 55 TFLOP; FID: 8 images x 123 / 201 TFLOP (SD-2 / PixArt-Σ; the meta counts
# of real_shape_rehearsal.py).
PHASE_BUDGET_S = {
    "unet": {
        "set-up": 120.0,
        "FLOP count": 30.0,
        "batch search": FULL["search_budget_s"],
        "grounding": 45.0,
        "FID": 60.0,
    },
    "pixart": {"set-up": 210.0, "FLOP count": 60.0, "batch search": 120.0, "grounding": 45.0, "FID": 60.0},
}
TOTAL_BUDGET_S = {"unet": 480.0, "pixart": 540.0}
GIB = 2**30


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(rehearsal.BACKBONES), default="unet", help="SD-2 or PixArt-Σ")
    parser.add_argument("--quick", action="store_true", help=f"tiny widths, real structure, CPU is fine: {QUICK}")
    parser.add_argument(
        "--text-encoder-weights",
        choices=sorted(rehearsal.TEXT_ENCODER_WEIGHTS),
        default="fp32",
        help="dtype the text encoder is stored and run in (bf16: PixArt's T5-XXL in half the memory, frozen variant)",
    )
    add_device_argument(parser)
    parser.add_argument("--resolution", type=int, help=f"image side in px (default {FULL['resolution']})")
    parser.add_argument("--max-batch-size", type=int, help="stop doubling here (default: until out of memory)")
    parser.add_argument("--steps", type=int, help=f"timed steps per batch size (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    parser.add_argument("--variant", choices=sorted(sd2_shape.VARIANTS), default="frozen", help="frozen, learnable")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--grounding-pairs", type=int, help=f"pairs in one grounding batch ({FULL['grounding_pairs']})")
    parser.add_argument("--fid-images", type=int, help=f"images in one FID generation batch ({FULL['fid_images']})")
    parser.add_argument("--fid-steps", type=int, help=f"DDIM steps (default: the paper's {FULL['fid_steps']})")
    parser.add_argument(
        "--search-budget-s", type=float, help=f"seconds the batch search may take (default {FULL['search_budget_s']})"
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by GPU name)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.backbone == "pixart" and not args.quick:
        preset = preset | {"search_budget_s": PHASE_BUDGET_S["pixart"]["batch search"]}
    sizes = ("resolution", "max_batch_size", "steps", "warmup_steps", "grounding_pairs", "fid_images", "fid_steps")
    fill_from_preset(args, preset, [*sizes, "search_budget_s"])
    if args.text_encoder_weights != "fp32" and (args.backbone != "pixart" or args.variant != "frozen"):
        parser.error("--text-encoder-weights bf16 is for --backbone pixart with the frozen variant")
    dtype = rehearsal.TEXT_ENCODER_WEIGHTS[args.text_encoder_weights]
    args.model = rehearsal.rehearsed_model(args.backbone, args.quick, dtype)
    if min(getattr(args, key) for key in sizes) < 1:
        parser.error("sizes and step counts must be at least 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be positive")
    return args


# --------------------------------------------------------------------------------------------- placement
class WrongDevice(RuntimeError):
    """A parameter or buffer is not on the device the run measures: its numbers would be another device's."""


def assert_on_device(module: torch.nn.Module, device: torch.device, where: str) -> None:
    """Raise ``WrongDevice`` naming the first parameter or buffer of ``module`` that is not on ``device``."""
    misplaced = [
        (name, tensor.device)
        for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
        if tensor.device != device
    ]
    if misplaced:
        name, found = misplaced[0]
        raise WrongDevice(
            f"{where}: {type(module).__name__}.{name} is on {found}, not on the requested device {device} "
            f"({len(misplaced)} parameters and buffers are elsewhere)"
        )


def on_device(name: str, device: torch.device, modules: Sequence[torch.nn.Module], run: Callable[[], Result]) -> Result:
    """``run()``, with every module checked to be on ``device`` before and after it."""
    for module in modules:
        assert_on_device(module, device, f"start of {name}")
    result = run()
    for module in modules:
        assert_on_device(module, device, f"end of {name}")
    return result


class KeepOnDevice(SingleDeviceStrategy):
    """Lightning's single-device strategy, except that its teardown leaves the module where it is.

    Lightning's teardown moves the module and the optimizer state to the CPU after every fit (to give the GPU back
    to whatever follows); here the next batch size, grounding and FID follow on the same device. The optimizer
    state is dropped instead of copied: every fit builds its own.
    """

    def teardown(self) -> None:
        self.optimizers, self.lr_scheduler_configs = [], []
        module, self._lightning_module = self._lightning_module, None  # Strategy.teardown moves only this module
        try:
            super().teardown()
        finally:
            self._lightning_module = module


def release_memory(device: torch.device) -> None:
    """Garbage of the last phase collected and, on a GPU, handed back by the caching allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------- training
@dataclass
class BatchResult:
    batch_size: int
    step_images_per_second: float | None  # None: out of memory
    end_to_end_images_per_second: float | None
    peak_bytes: int
    seconds: float  # the whole fit: Trainer start-up, warm-up and timed steps, teardown

    @property
    def fits(self) -> bool:
        return self.end_to_end_images_per_second is not None


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def cached_latent_loader(count: int, batch_size: int, resolution: int, latent_scale: float) -> DataLoader:
    """``count`` batches of cached posteriors in host memory, one sample per item, collated every step."""
    batches = rehearsal.training_batches(count, batch_size, resolution, cached_latents=True, latent_scale=latent_scale)
    samples = [
        {"latent_moments": moments, "caption": caption}
        for batch in batches
        for moments, caption in zip(batch["latent_moments"], batch["caption"], strict=True)
    ]
    return DataLoader(samples, batch_size=batch_size, collate_fn=collate_skipping_bad)


def training_throughput(
    module: LatentDiffusionModule, cfg, device: torch.device, args: argparse.Namespace, batch_size: int
) -> BatchResult:
    """One Trainer.fit on ``device``: --warmup-steps, then --steps timed ones (step only and end to end)."""
    release_memory(device)
    memory = PeakMemory(device)
    memory.reset()
    step_clock, window = StepClock(), SteadyStateClock(args.warmup_steps)
    trainer = lightning_trainer(cfg, args.warmup_steps + args.steps, [step_clock, window], KeepOnDevice(device))
    scale = module.vae.config.scaling_factor
    loader = cached_latent_loader(args.warmup_steps + args.steps, batch_size, args.resolution, scale)
    start, fitted = clock(device), True
    try:
        trainer.fit(module, train_dataloaders=loader)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not out_of_memory(error):
            raise
        fitted = False
    seconds, peak = clock(device) - start, memory.peak_bytes()
    module.zero_grad(set_to_none=True)
    if not fitted:  # freed here, outside the except clause, whose traceback holds the failed step's tensors
        release_memory(device)
        return BatchResult(batch_size, None, None, peak, seconds)
    images = batch_size * args.steps
    step_seconds = sum(step_clock.seconds[args.warmup_steps :])
    return BatchResult(batch_size, images / step_seconds, images / (window.end - window.start), peak, seconds)


def doubling_batch_sizes(
    measure: Callable[[int], BatchResult], max_batch_size: int, budget_s: float
) -> tuple[list[BatchResult], str]:
    """Batch 1, 2, 4, ... until the first that runs out of memory (its result is last), ``max_batch_size``, or a
    next batch that, forecast at twice the last one's wall time, would end past ``budget_s``; and why it stopped."""
    results: list[BatchResult] = []
    batch_size, spent = 1, 0.0
    while batch_size <= max_batch_size:
        if results and spent + 2 * results[-1].seconds > budget_s:
            return results, f"batch {batch_size} would end past the {budget_s:.0f} s search budget"
        results.append(measure(batch_size))
        spent += results[-1].seconds
        if not results[-1].fits:
            return results, "out of memory"
        batch_size *= 2
    return results, f"--max-batch-size {max_batch_size} reached, no OOM"


def training_flops_per_image(args: argparse.Namespace) -> tuple[int, int]:
    """(model, hardware) FLOPs of one image's training step: without recomputation, and as executed (gradient
    checkpointing recomputes each checkpointed block's forward)."""
    count = partial(rehearsal.meta_training_flops, args.model, args.resolution, 1, args.variant, cached_latents=True)
    model = count(checkpointing=False)
    return model, count(checkpointing=True) if args.gradient_checkpointing else model


# --------------------------------------------------------------------------------------------- evaluation
def timed_after_warmup(
    device: torch.device, run: Callable[[], object], warmup: Callable[[], object]
) -> tuple[float, int]:
    """Seconds and peak memory of ``run()`` after one ``warmup()`` call (kernel selection, allocator growth)."""
    release_memory(device)
    warmup()
    memory = PeakMemory(device)
    release_memory(device)
    memory.reset()
    start = clock(device)
    run()
    return clock(device) - start, memory.peak_bytes()


# --------------------------------------------------------------------------------------------- report
@dataclass
class PhaseTime:
    name: str
    seconds: float
    budget_s: float


def timed_phase(
    phases: list[PhaseTime], name: str, device: torch.device, run: Callable[[], Result], budgets: dict[str, float]
) -> Result:
    """``run()``, its wall time kept for the table and said at once (stderr), so an interrupted run leaves it."""
    start = clock(device)
    result = run()
    phases.append(PhaseTime(name, clock(device) - start, budgets[name]))
    print(f"[done] {name}: {phases[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    return result


def utilisation(rate: float, flops: int, peak: float | None) -> str:
    return "-" if peak is None else f"{rate * flops / peak:.2%}"


def throughput_table(results: list[BatchResult], model_flops: int, hardware_flops: int, peak: float | None) -> str:
    lines = [
        "| batch | images/s end to end | images/s step only | peak memory GiB | model TFLOP/s | hardware TFLOP/s "
        "| MFU | HFU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        memory = f"{result.peak_bytes / GIB:.2f}"
        if not result.fits:
            lines.append(f"| {result.batch_size} | out of memory | - | {memory} | - | - | - | - |")
            continue
        rate = result.end_to_end_images_per_second
        lines.append(
            f"| {result.batch_size} | {rate:.3f} | {result.step_images_per_second:.3f} | {memory} | "
            f"{rate * model_flops / 1e12:.4f} | {rate * hardware_flops / 1e12:.4f} | "
            f"{utilisation(rate, model_flops, peak)} | {utilisation(rate, hardware_flops, peak)} |"
        )
    return "\n".join(lines)


def phase_table(phases: list[PhaseTime], total_budget_s: float) -> str:
    lines = ["| phase | seconds | budget s (default run, one H100) |", "|---|---:|---:|"]
    lines += [f"| {phase.name} | {phase.seconds:.1f} | {phase.budget_s:.0f} |" for phase in phases]
    lines.append(f"| total | {sum(p.seconds for p in phases):.1f} | {total_budget_s:.0f} (imports included) |")
    return "\n".join(lines)


@dataclass
class Measured:
    results: list[BatchResult]
    stop: str  # why the batch search stopped
    model_flops: int  # per image, without recomputation
    hardware_flops: int  # per image, as executed
    grounding: tuple[float, int]  # seconds, peak bytes
    fid: tuple[float, int]
    phases: list[PhaseTime]
    sampler: str  # the backbone's, which the FID generation ran


def rehearse(args: argparse.Namespace, device: torch.device) -> Measured:
    """Every phase on ``device``: set-up, FLOP count, batch search, grounding, FID."""
    phases: list[PhaseTime] = []
    family, budgets = args.model.family, PHASE_BUDGET_S[args.backbone]
    with tempfile.TemporaryDirectory(prefix=f"{args.backbone}-shape-") as scratch:

        def set_up() -> tuple[LatentDiffusionModule, object, torch.nn.Module]:
            parts = args.model.build_parts(args.resolution)
            folder = family.write_pipeline(parts, Path(scratch) / "p")
            del parts
            overrides = sd2_shape.config_overrides(folder, args.resolution, 1, args.gradient_checkpointing)
            accelerator = "gpu" if device.type == "cuda" else "cpu"
            module, cfg = family.load_module(folder, args.variant, [*overrides, f"trainer.accelerator={accelerator}"])
            extractor = rehearsal.random_domain_extractor(Path(scratch) / "domain")
            return module.to(device), cfg, extractor.to(device)

        module, cfg, extractor = timed_phase(phases, "set-up", device, set_up, budgets)
        print(
            f"model: {args.model.shape.name}, random weights, variant {args.variant} (trains "
            f"{'+'.join(module.trainable)}), text encoder weights {rehearsal.text_encoder_weights(module)}, "
            f"{args.resolution} px, bf16-mixed, cached latents, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; device: {device_name(device)}, every "
            f"phase on {device}; memory: {PeakMemory(device).what}",
            flush=True,
        )
        flops = partial(training_flops_per_image, args)
        model_flops, hardware_flops = timed_phase(phases, "FLOP count", device, flops, budgets)

        def one_batch_size(batch_size: int) -> BatchResult:
            measure = partial(training_throughput, module, cfg, device, args, batch_size)
            return on_device(f"batch {batch_size}", device, [module], measure)

        search = partial(doubling_batch_sizes, one_batch_size, args.max_batch_size, args.search_budget_s)
        results, stop = timed_phase(phases, "batch search", device, search, budgets)

        module.eval()
        grounding = partial(
            timed_after_warmup,
            device,
            partial(rehearsal.grounding_evaluation, module, args.grounding_pairs, args.resolution),
            partial(rehearsal.grounding_evaluation, module, 1, args.resolution),
        )
        grounded = partial(on_device, "grounding", device, [module], grounding)
        fid = partial(
            timed_after_warmup,
            device,
            partial(rehearsal.fid_update, module, extractor, args.fid_images, args.fid_steps),
            partial(rehearsal.fid_update, module, extractor, 1, 1),
        )
        scored = partial(on_device, "FID", device, [module, extractor], fid)
        return Measured(
            results,
            stop,
            model_flops,
            hardware_flops,
            timed_phase(phases, "grounding", device, grounded, budgets),
            timed_phase(phases, "FID", device, scored, budgets),
            phases,
            rehearsal.sampler_name(module),
        )


def report(args: argparse.Namespace, name: str, peak: tuple[str, float] | None, measured: Measured) -> None:
    """The throughput table, the best batch against the anchor and the goal, grounding, FID and the phase times."""
    model_flops, hardware_flops = measured.model_flops, measured.hardware_flops
    peak_flops = None if peak is None else peak[1]
    print("\n## Training throughput by batch size\n")
    print(throughput_table(measured.results, model_flops, hardware_flops, peak_flops))
    fitted = [result for result in measured.results if result.fits]
    if not fitted:
        raise SystemExit("not even batch 1 fits in memory")
    best = max(fitted, key=lambda result: result.end_to_end_images_per_second)
    rate, largest = best.end_to_end_images_per_second, fitted[-1]
    if peak is None:
        utilisations = f"no dense bf16 peak known for {name}: pass --peak-tflops for MFU and HFU"
    else:
        utilisations = (
            f"against the dense bf16 peak of {peak[0]} ({peak[1] / 1e12:g} TFLOP/s): MFU "
            f"{utilisation(rate, model_flops, peak_flops)} (model FLOPs, no recomputation), HFU "
            f"{utilisation(rate, hardware_flops, peak_flops)} (hardware FLOPs, recomputation included)"
        )
    (grounding_seconds, grounding_peak), (fid_seconds, fid_peak) = measured.grounding, measured.fid
    print(
        f"\nlargest batch that fits: {largest.batch_size} ({largest.peak_bytes / GIB:.2f} GiB peak); search stopped: "
        f"{measured.stop}"
        f"\nbest training throughput: {rate:.3f} images/s end to end per device at batch {best.batch_size} "
        f"({best.step_images_per_second:.3f} step only); {model_flops / 1e9:.2f} GFLOP per image model, "
        f"{hardware_flops / 1e9:.2f} hardware"
        f"\nutilisation {utilisations}"
        f"\ngrounding: {grounding_seconds / args.grounding_pairs:.3f} s per pair ({args.grounding_pairs} pairs in one "
        f"batch, N={rehearsal.GROUNDING.num_inference_steps}, K={rehearsal.GROUNDING.last_k_steps}, metrics "
        f"included; {grounding_peak / GIB:.2f} GiB peak)"
        f"\nFID: {args.fid_images / fid_seconds:.3f} images/s ({args.fid_images} images, {args.fid_steps} "
        f"{measured.sampler} steps, guidance {rehearsal.PAPER['guidance']:g}, domain extractor; "
        f"{fid_peak / GIB:.2f} GiB peak)"
    )
    if args.backbone == "unet":
        print(
            f"anchor: MosaicML SD-2 512 px, precomputed latents: {ANCHOR_IMAGES_PER_S:.0f} images/s per A100; "
            f"ours (end to end) / anchor = {rate / ANCHOR_IMAGES_PER_S:.3f}"
            f"\ngoal: >= {GOAL_IMAGES_PER_S:.0f} images/s per H100/H200; ours (end to end) / goal = "
            f"{rate / GOAL_IMAGES_PER_S:.3f}"
        )
    else:
        print("anchor: none (no published PixArt-Σ fine-tuning throughput); goal: none set")
    print("\n## Time per phase\n")
    print(phase_table(measured.phases, TOTAL_BUDGET_S[args.backbone]))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sd2_shape.quiet_process(args.threads)
    device = torch.empty(0, device=args.device).device  # "cuda" -> "cuda:0": the index parameters report
    name = device_name(device)
    peak = ("--peak-tflops", args.peak_tflops * 1e12) if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        peak = sd2_shape.bf16_dense_peak(name)
    report(args, name, peak, rehearse(args, device))


if __name__ == "__main__":
    main()
