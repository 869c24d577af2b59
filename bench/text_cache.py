"""The frozen-text-feature cache: training step time with a batch's cache misses encoded one caption at a time
(per-miss, the former behaviour) against all of them in one call (batched), and with the cache off.

    python bench/text_cache.py                       # the default model (MiniLM, random VAE), batch 16, 64 px
    python bench/text_cache.py --steps 20 --repeats 5
    python bench/text_cache.py trainer.precision=bf16-mixed   # any key=value config override
    python bench/text_cache.py --quick               # seconds, for tests
    python bench/text_cache.py --threads 1           # on a busy machine

Two caption streams: "unique" (every caption new, as MIMIC impressions mostly are) and "pool" (captions drawn
from a few dozen, as the embedded synthetic set's templated reports). Caption dropout is on (ucg_probability), so
"" recurs in both. Each mode trains a fresh copy of the same initial module (empty cache) on the same batches;
a step is training_step + backward + AdamW step, timed after the warm-up steps; modes rotate their order every
repeat and step times are medians over repeats. The batched mode's cached features are compared bit for bit
with the per-miss mode's: the resume-exactness condition (a resumed run's cache starts empty).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/diffusers are imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import copy
import logging
import statistics
import time
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from train_throughput import fill_from_preset

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.text_conditioning import text_feature_batch_size

FULL = {"steps": 10, "warmup_steps": 2, "repeats": 3}
QUICK = {"steps": 2, "warmup_steps": 1, "repeats": 2}
QUICK_SIZES = ["data.resolution=32", "data.batch_size=4"]
MODES = ("per-miss", "batched", "off")
FINDINGS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Left apical pneumothorax, small.",
    "Bilateral pleural effusions, larger on the right.",
]
POOL_SIZE = 48


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    parser.add_argument("--repeats", type=int, help=f"runs of each mode (default {FULL['repeats']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a busy machine")
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}, {QUICK_SIZES}")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.batch_size=32")
    args = parser.parse_args(argv)
    fill_from_preset(args, QUICK if args.quick else FULL)
    if min(args.steps, args.warmup_steps + 1, args.repeats, args.threads or 1) < 1:
        parser.error("--steps, --repeats and --threads must be at least 1, --warmup-steps at least 0")
    sizes = QUICK_SIZES if args.quick else []
    args.overrides = ["model.vae.pretrained=null", "train.use_ema=false", *sizes, *args.overrides]
    return args


def caption_stream(kind: str, count: int) -> list[str]:
    """``count`` captions: all distinct ("unique") or drawn from POOL_SIZE distinct ones ("pool")."""
    generator = torch.Generator().manual_seed(0)
    if kind == "unique":
        return [f"{FINDINGS[i % len(FINDINGS)]} Study {i}." for i in range(count)]
    draws = torch.randint(0, POOL_SIZE, (count,), generator=generator).tolist()
    return [f"{FINDINGS[i % len(FINDINGS)]} Variant {i}." for i in draws]


def make_batches(kind: str, steps: int, batch_size: int, resolution: int) -> list[dict]:
    captions = caption_stream(kind, steps * batch_size)
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
            "caption": captions[step * batch_size : (step + 1) * batch_size],
        }
        for step in range(steps)
    ]


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def configured(initial: LatentDiffusionModule, mode: str, batch_size: int) -> LatentDiffusionModule:
    module = copy.deepcopy(initial)
    module.text_feature_cache.clear()
    if mode == "off":
        module.text_feature_cache_size = 0
    module.text_feature_batch_size = 1 if mode == "per-miss" else batch_size
    return module


def train_steps(module: LatentDiffusionModule, batches: list[dict], warmup_steps: int, autocast: bool) -> dict:
    """Seconds of the steps after the warm-up, with the encoder's calls and seconds in them."""
    device = module.device
    encoder_calls, encoder_seconds = [0], [0.0]
    run_text_encoder = module._run_text_encoder

    def counted(captions, *args, **kwargs):
        started = clock(device)
        features = run_text_encoder(captions, *args, **kwargs)
        encoder_seconds[0] += clock(device) - started
        encoder_calls[0] += 1
        return features

    module._run_text_encoder = counted
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup_steps:
            start, encoder_calls[0], encoder_seconds[0] = clock(device), 0, 0.0
        batch = {**batch, "pixel_values": batch["pixel_values"].to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = module.training_step(batch, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timed = len(batches) - warmup_steps
    return {
        "step_ms": (clock(device) - start) / timed * 1e3,
        "calls": encoder_calls[0] / timed,
        "encoder_ms": encoder_seconds[0] / timed * 1e3,
    }


def compare_caches(batched: LatentDiffusionModule, per_miss: LatentDiffusionModule) -> tuple[int, bool, float]:
    common = [caption for caption in batched.text_feature_cache if caption in per_miss.text_feature_cache]
    pairs = [(batched.text_feature_cache[c], per_miss.text_feature_cache[c]) for c in common]
    identical = all(torch.equal(a, b) for a, b in pairs)
    largest = max(((a.float() - b.float()).abs().max().item() for a, b in pairs), default=0.0)
    return len(common), identical, largest


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer logs nothing
    cfg = load_config([], args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = str(cfg.trainer.precision).startswith("bf16")
    torch.manual_seed(cfg.seed)
    initial = LatentDiffusionModule.from_config(cfg).to(device)
    if "text_encoder" in initial.trainable:
        raise SystemExit("model.trainable includes text_encoder: its features are never cached")
    batch_size, steps = cfg.data.batch_size, args.warmup_steps + args.steps
    print(
        f"text-feature cache: text encoder {initial.text_encoder.config.model_type} "
        f"({initial.text_encoder.config.num_hidden_layers} layers, {initial.tokenizer.model_max_length} tokens), "
        f"batch {batch_size}, {cfg.data.resolution} px, {args.steps} steps (+{args.warmup_steps} warm-up), "
        f"{args.repeats} repeats, {device.type}, precision {cfg.trainer.precision}, "
        f"ucg {cfg.train.ucg_probability}, torch threads {torch.get_num_threads()}"
    )
    default = text_feature_batch_size(cfg)
    print(f"train.text_feature_batch_size=null picks {default} here ({'per-miss' if default == 1 else 'batched'})")
    print(
        "modes: per-miss = each miss encoded alone; batched = a batch's misses in one call of exactly "
        f"{batch_size} captions (padded); off = the whole batch encoded every step, no cache"
    )
    for kind in ("unique", "pool"):
        batches = make_batches(kind, steps, batch_size, cfg.data.resolution)
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
            modules = {}
            for mode in order:
                modules[mode] = configured(initial, mode, batch_size)
                results[mode].append(train_steps(modules[mode], batches, args.warmup_steps, autocast))
            times = ", ".join(f"{mode} {results[mode][-1]['step_ms']:.1f}" for mode in MODES)
            print(f"{kind} repeat {repeat + 1}/{args.repeats} ({order[0]} first): {times} ms/step")
        medians = {
            mode: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for mode, runs in results.items()
        }
        summary = ", ".join(
            f"{mode} {m['step_ms']:.1f} ms/step ({m['calls']:.1f} encoder calls, {m['encoder_ms']:.1f} ms encoding)"
            for mode, m in medians.items()
        )
        print(f"{kind}: {summary}")
        count, identical, largest = compare_caches(modules["batched"], modules["per-miss"])
        print(
            f"{kind} cached features, batched vs per-miss: {count} captions, "
            f"bit-identical: {'yes' if identical else 'no'} (max |diff| {largest:.3g})"
        )
        for other in ("batched", "off"):
            ratio = medians["per-miss"]["step_ms"] / medians[other]["step_ms"]
            print(f"ratio {kind}, per-miss / {other} step time: {ratio:.2f}")


if __name__ == "__main__":
    main()
