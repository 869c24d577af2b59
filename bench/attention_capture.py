"""What attention capture and grounding evaluation cost: time ratio of sampling with capture on/off, seconds
per in-training grounding call, and peak memory of grounding evaluation for N and 4N pairs (should be flat).

    python bench/attention_capture.py                      # the default run's model (random weights), CPU
    python bench/attention_capture.py --quick              # seconds, for tests: few pairs and DDIM steps
    python bench/attention_capture.py --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --items 32
    python bench/attention_capture.py model.vae.pretrained=null trainer.accelerator=cpu   # config overrides

Without --model the default config's architecture is built with random weights (model.vae.pretrained=null
unless overridden), which costs what the default run's callbacks cost. Memory is measured in a fresh process
per item count (peak resident set size, and the tracemalloc peak of the evaluation loop's Python objects).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig
from train_throughput import fill_from_preset

from callbacks.attention_heatmaps import AttentionHeatmapCallback
from callbacks.grounding import GroundingCallback
from configs import load_config
from datamodules.cxr_datamodule import resolve_data_root
from grounding.evaluation import evaluate_grounding, grounding_items, heatmap_settings
from grounding.phrase_grounding import HeatmapSettings, generation_heatmaps
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from metrics.grounding_metrics import PhraseGroundingMetrics

FULL = {"items": 16, "repeats": 3}
QUICK = {"items": 2, "repeats": 1}
# Two DDIM steps, two pairs per callback call: every code path of the full run, in seconds.
QUICK_OVERRIDES = [
    "sampling.num_inference_steps=2",
    *(
        f"callbacks.{name}.{key}={value}"
        for name in ("grounding", "attention_heatmaps")
        for key, value in (("num_items", 2), ("num_inference_steps", 2), ("last_k_steps", 1))
    ),
]


def load_model(model: str | None, overrides: Sequence[str]) -> tuple[LatentDiffusionModule, DictConfig]:
    if model:
        return load_diffusion_module(model, overrides)
    cfg = load_config([], ["model.vae.pretrained=null", *overrides])
    return LatentDiffusionModule.from_config(cfg).eval(), cfg


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each run; runs alternate so that load from other processes hits all alike."""
    for run in runs.values():
        run()  # warm-up: first calls allocate and pick kernels
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(wall for wall, _ in pairs), statistics.median(cpu for _, cpu in pairs))
        for name, pairs in times.items()
    }


def capture_overhead(module: LatentDiffusionModule, cfg: DictConfig, repeats: int) -> None:
    prompts = list(cfg.sampling.validation_prompts)
    steps, guidance = int(cfg.sampling.num_inference_steps), float(cfg.sampling.guidance_scale)
    settings = HeatmapSettings(num_inference_steps=steps, last_k_steps=steps, seed=0)
    every_token = [None] * len(prompts)
    seconds = median_seconds(
        {
            "off": lambda: module.sample(prompts, steps, guidance, seed=0),
            "on": lambda: generation_heatmaps(module, prompts, every_token, settings, guidance),
        },
        repeats,
    )
    (off_wall, off_cpu), (on_wall, on_cpu) = seconds["off"], seconds["on"]
    print(
        f"sampling {len(prompts)} prompts x {steps} DDIM steps, guidance {guidance:g}, every cross-attention layer "
        f"recorded at every step: capture off {off_wall:.2f} s ({off_cpu:.2f} CPU-s), on {on_wall:.2f} s "
        f"({on_cpu:.2f} CPU-s) -> {on_wall / off_wall:.2f}x wall, {on_cpu / off_cpu:.2f}x CPU (goal <= 1.3x)"
    )


def callback_cost(module: LatentDiffusionModule, cfg: DictConfig, data_root: Path, repeats: int, out_dir: Path) -> None:
    grounding = GroundingCallback.from_config(cfg, data_root)
    heatmaps = AttentionHeatmapCallback.from_config(cfg, data_root, out_dir)
    single_process = SimpleNamespace(global_rank=0, world_size=1)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], global_step=0)
    steps = itertools.count(1)

    def draw_panel() -> None:
        trainer.global_step = next(steps)  # the callback draws once per step
        heatmaps.run(trainer, module)

    runs = {"grounding": lambda: grounding.evaluate(single_process, module), "heatmaps": draw_panel}
    seconds = median_seconds(runs, repeats)
    for name, callback in (("grounding", grounding), ("heatmaps", heatmaps)):
        wall, cpu = seconds[name]
        settings = callback.settings
        print(
            f"{type(callback).__name__} call: {len(callback.items)} pairs, last {settings.last_k_steps} of "
            f"{settings.num_inference_steps} DDIM steps, batch {callback.batch_size}: {wall:.2f} s ({cpu:.2f} CPU-s)"
        )
    print(f"heatmap grids written: {sum(path is not None for path in heatmaps.written)} of {repeats + 1} calls")


def measure_memory(module: LatentDiffusionModule, cfg: DictConfig, data_root: Path, num_items: int) -> dict:
    """Run the evaluation over ``num_items`` pairs (the split cycled) in this process; report its peaks."""
    pool = grounding_items(cfg.data.ms_cxr_csv, data_root, cfg.grounding.split)
    items = list(itertools.islice(itertools.cycle(pool), num_items))
    settings = heatmap_settings(cfg.grounding, **in_training_steps(cfg))
    metric = PhraseGroundingMetrics(thresholds=tuple(cfg.grounding.thresholds), seed=settings.seed)
    tracemalloc.start()
    evaluate_grounding(module, items, data_root, cfg.data.resolution, settings, metric, int(cfg.grounding.batch_size))
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "items": num_items,
        "count": int(metric.compute()["count"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tracemalloc_peak_mb": python_peak / 2**20,
    }


def in_training_steps(cfg: DictConfig) -> dict[str, int]:
    """The in-training callback's N and K: memory is measured for the evaluation the run performs."""
    own = cfg.callbacks.grounding
    return {"num_inference_steps": int(own.num_inference_steps), "last_k_steps": int(own.last_k_steps)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a run's .ckpt or a diffusers folder (default: the default architecture)")
    parser.add_argument("--items", type=int, help=f"N for the memory run, also runs 4N (default {FULL['items']})")
    parser.add_argument("--repeats", type=int, help=f"timed repetitions, median reported (default {FULL['repeats']})")
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}, {QUICK_OVERRIDES}")
    parser.add_argument("--memory-only", type=int, help=argparse.SUPPRESS)  # the child process of the memory run
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. grounding.batch_size=4")
    args = parser.parse_args(argv)
    fill_from_preset(args, QUICK if args.quick else FULL)
    if args.quick:
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    torch.manual_seed(0)
    module, cfg = load_model(args.model, args.overrides)
    data_root = resolve_data_root(cfg.data)
    if args.memory_only:
        print(json.dumps(measure_memory(module, cfg, data_root, args.memory_only)))
        return
    print(f"model: {args.model or 'default architecture, random weights'}; torch threads {torch.get_num_threads()}")
    capture_overhead(module, cfg, args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-attention-heatmaps-") as out_dir:
        callback_cost(module, cfg, data_root, args.repeats, Path(out_dir))
    runs = []
    for num_items in (args.items, 4 * args.items):
        command = [sys.executable, __file__, "--memory-only", str(num_items)]
        command += ["--model", args.model] if args.model else []
        command += args.overrides
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    for run in runs:
        print(
            f"grounding evaluation of {run['items']} pairs: peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"tracemalloc peak {run['tracemalloc_peak_mb']:.2f} MB"
        )
    print(
        f"memory 4N/N: RSS {runs[1]['peak_rss_mb'] / runs[0]['peak_rss_mb']:.3f}x, Python objects "
        f"{runs[1]['tracemalloc_peak_mb'] / runs[0]['tracemalloc_peak_mb']:.3f}x (goal: flat, 1.0x)"
    )


if __name__ == "__main__":
    main()
