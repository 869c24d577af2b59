"""Training speed against the loop users would otherwise write: images/s of our LatentDiffusionModule +
lightning.Trainer and of a minimal hand-written PyTorch loop with the standard diffusers objective.

    python bench/train_throughput.py                    # the default model (random VAE), batch 16, 64 px
    python bench/train_throughput.py --steps 40 --repeats 7 --batch-size 8
    python bench/train_throughput.py model.trainable=[unet,text_encoder]   # any key=value config override
    python bench/train_throughput.py --quick            # seconds: 32 px, batch 4, 3 steps, 3 repeats
    python bench/train_throughput.py --profile          # where the time goes (always shown below 0.95)
    python bench/train_throughput.py --threads 1        # on a busy machine (see below)

Both sides do identical work: the same model (built once, deep-copied per run: the same initial weights),
the same batches (collated once by the project's DataLoader and kept in memory, so image decoding neither
dominates nor differs), seed, batch size, steps, AdamW settings, learning-rate warm-up and gradient clipping.
EMA and the frozen-text-feature cache are off (the plain loop has neither); both tokenize the captions inside
the step; our step keeps its caption dropout (one random draw: padding fixes the token count, so the compute
is the same). Lightning runs without logger, checkpointing, progress bar or validation. A run is timed from
the end of its last warm-up step to the end of its last step (data fetch and hooks included); Trainer.fit's
start-up and teardown are reported apart. Runs alternate ours/plain, flipping the order every repeat, so a
busy machine slows both alike; images/s are medians over repeats and the ratio is ours/plain of the medians.

Both sides run in this process, under the OpenMP wait setting train.py applies (configs/process_defaults.py, set
before torch loads; a value in the shell wins), printed in the header: the ratio compares code. How that setting
compares with libgomp's own default (what the diffusers example runs under) is bench/busy_machine.py's to measure.
On a machine that other jobs keep busy, torch threads that outnumber the free cores wait on each other (steps
100x slower seen on 2 cores): use --threads 1 there, and trust the ratio more than the images/s.
"""

from __future__ import annotations

import os

import configs.process_defaults  # noqa: F401  (as train.py: OpenMP waiting and known noise, before torch loads)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/diffusers are imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import copy
import cProfile
import itertools
import logging
import pstats
import re
import statistics
import time
import warnings
from argparse import RawDescriptionHelpFormatter
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from configs import ConfigError, load_config
from configs.process_defaults import WAIT_VARIABLES
from datamodules.cxr_datamodule import resolve_data_root
from lightning_modules.latent_diffusion import LatentDiffusionModule
from train import build_datamodule

GOAL = 0.95
REPO = Path(__file__).resolve().parents[1]
IDENTICAL_WORK = ["train.use_ema=false", "train.text_feature_cache_size=0"]
FULL = {"steps": 20, "warmup_steps": 3, "repeats": 5}
QUICK = {"steps": 3, "warmup_steps": 1, "repeats": 3}
QUICK_SIZES = ["data.resolution=32", "data.batch_size=4"]


def fill_from_preset(args: argparse.Namespace, preset: dict, keys: Sequence[str] | None = None) -> None:
    """Every option of ``keys`` (default: all of the preset's) left unset on the command line takes the preset's
    value (the quick or the full run's)."""
    for key in preset if keys is None else keys:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps (default {FULL['warmup_steps']})")
    parser.add_argument("--repeats", type=int, help=f"runs of each side (default {FULL['repeats']})")
    parser.add_argument("--batch-size", type=int, help="images per step (default: data.batch_size)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a busy machine")
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}, {QUICK_SIZES}")
    parser.add_argument("--profile", action="store_true", help=f"where time goes, even at ratio >= {GOAL}")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.resolution=128")
    args = parser.parse_args(argv)
    fill_from_preset(args, QUICK if args.quick else FULL)
    counts = [args.steps, args.warmup_steps, args.repeats, args.batch_size, args.threads]
    if any(count is not None and count < 1 for count in counts):
        parser.error("--steps, --warmup-steps, --repeats, --batch-size and --threads must be at least 1")
    sizes = QUICK_SIZES if args.quick else []
    batch_size = [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    args.overrides = ["model.vae.pretrained=null", *sizes, *args.overrides, *batch_size, *IDENTICAL_WORK]
    return args


def check_comparable(cfg: DictConfig) -> None:
    """Settings the plain loop does not mirror would make the comparison unfair: refuse them by name."""
    if str(cfg.trainer.precision) not in ("32", "32-true"):
        raise ConfigError(f"trainer.precision must be 32-true (as the loop), got {cfg.trainer.precision}")
    if cfg.train.snr_gamma is not None:
        raise ConfigError(f"train.snr_gamma must be null (plain MSE, as the loop), got {cfg.train.snr_gamma}")


def in_memory_batches(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, count: int) -> list[dict]:
    """``count`` batches of the project's training DataLoader (cycled if the split is shorter), in memory."""
    datamodule = build_datamodule(cfg, resolve_data_root(cfg.data), cfg.data.batch_size, tokenizer=tokenizer)
    datamodule.setup("fit")
    return list(itertools.islice(itertools.cycle(datamodule.train_dataloader()), count))


def in_memory_loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SteadyStateClock(L.Callback):
    """The clock when training starts, at the end of the last warm-up step and after each later step."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.train_start = self.start = self.end = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.train_start = clock(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = clock(pl_module.device)
        if batch_idx == self.warmup_steps - 1:
            self.start = now
        self.end = now


def lightning_trainer(
    cfg: DictConfig, max_steps: int, callbacks: list[L.Callback], strategy: str | Strategy = "auto"
) -> L.Trainer:
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        strategy=strategy,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=max_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def prepare_ours(
    initial: LatentDiffusionModule, cfg: DictConfig, batches: list[dict], warmup_steps: int
) -> Callable[[], dict[str, float]]:
    """(a) A fresh copy of our LatentDiffusionModule and a lightning.Trainer; the returned call trains it."""
    module = copy.deepcopy(initial)
    timer = SteadyStateClock(warmup_steps)
    trainer = lightning_trainer(cfg, len(batches), [timer])
    loader = in_memory_loader(batches)

    def run() -> dict[str, float]:
        called = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        returned = time.perf_counter()
        return {
            "seconds": timer.end - timer.start,
            "fit_overhead": timer.train_start - called + returned - timer.end,
        }

    return run


def plain_loop(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    noise_scheduler: DDPMScheduler,
    cfg: DictConfig,
    loader: DataLoader,
    warmup_steps: int,
    device: torch.device,
) -> float:
    """(b) The diffusers text-to-image training loop as users write it; seconds of the post-warm-up steps."""
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    trainable = list(cfg.model.trainable)
    for name, part in parts.items():
        part.to(device).requires_grad_(name in trainable).train(name in trainable)  # frozen: eval, as loaded
    learning_rates = cfg.train.learning_rate
    groups = [{"params": parts[name].parameters(), "lr": float(learning_rates[name])} for name in trainable]
    optimizer = torch.optim.AdamW(
        groups, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), weight_decay=cfg.train.adam_weight_decay
    )
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=cfg.train.lr_warmup_steps)
    trained_parameters = [p for name in trainable for p in parts[name].parameters()]
    use_mask = cfg.model.text_encoder.use_attention_mask
    start = end = 0.0
    for step, batch in enumerate(loader):
        latents = vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        num_timesteps = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        tokens = tokenizer(
            batch["caption"],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).to(device)
        encoder_hidden_states = text_encoder(
            tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None
        )[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        if cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(trained_parameters, cfg.trainer.gradient_clip_val)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        end = clock(device)
        if step == warmup_steps - 1:
            start = end
    return end - start


def prepare_plain(
    initial: LatentDiffusionModule,
    cfg: DictConfig,
    batches: list[dict],
    warmup_steps: int,
    device: torch.device,
) -> Callable[[], dict[str, float]]:
    """(b) Fresh copies of the same parts; the returned call trains them with the plain loop."""
    fresh, loader = copy.deepcopy(initial), in_memory_loader(batches)
    parts = (fresh.unet, fresh.vae, fresh.text_encoder, fresh.tokenizer, fresh.noise_scheduler)
    return lambda: {"seconds": plain_loop(*parts, cfg, loader, warmup_steps, device)}


def package_of(filename: str, function: str) -> str:
    """Which library a profiled function belongs to: its site-packages folder, the project, or the stdlib."""
    if filename == "~":  # C functions: torch ops and Python builtins
        return "torch (C++ ops)" if "torch" in function else "python builtins"
    path = Path(filename)
    if "site-packages" in path.parts:
        top = path.parts[path.parts.index("site-packages") + 1]
        return "lightning" if top.startswith(("lightning", "pytorch_lightning")) else top
    if path == Path(__file__).resolve():
        return "this script (the plain loop)"
    return "cxr-diffusion (this project)" if path.is_relative_to(REPO) else "python stdlib"


def profile(run: Callable[[], object]) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.runcall(run)
    return pstats.Stats(profiler)


def own_seconds_by_package(stats: pstats.Stats) -> Counter[str]:
    totals: Counter[str] = Counter()
    for (filename, _, function), (_, _, own_seconds, _, _) in stats.stats.items():
        totals[package_of(filename, function)] += own_seconds
    return totals


def print_where_time_goes(ours_stats: pstats.Stats, plain_stats: pstats.Stats, rows: int = 8) -> None:
    """Own (exclusive) seconds per library in one profiled run of each side; our top Python functions."""
    ours_totals, plain_totals = own_seconds_by_package(ours_stats), own_seconds_by_package(plain_stats)
    print("\nwhere the time goes: cProfile own seconds in one run of each side (profiling slows Python code)")
    print(f"  {'library':<30}{'ours':>9}{'plain':>9}{'ours-plain':>12}")
    for package, seconds in ours_totals.most_common(rows):
        plain_seconds = plain_totals[package]
        print(f"  {package:<30}{seconds:>9.3f}{plain_seconds:>9.3f}{seconds - plain_seconds:>12.3f}")
    print(f"  {'total':<30}{ours_totals.total():>9.3f}{plain_totals.total():>9.3f}")
    print("  ours, top functions by own seconds outside torch ops (calls, seconds):")
    python_functions = [
        (own_seconds, calls, f"{Path(filename).name}:{line} {function}")
        for (filename, line, function), (_, calls, own_seconds, _, _) in ours_stats.stats.items()
        if filename != "~"
    ]
    for own_seconds, calls, where in sorted(python_functions, reverse=True)[:rows]:
        print(f"    {calls:>8} {own_seconds:>7.3f}  {where}")


def openmp_waiting() -> str:
    """The wait variables this process started with (train.py's default unless the shell set one), which libgomp
    read when torch loaded: both sides run under them (bench/busy_machine.py compares the settings)."""
    chosen = [f"{variable}={os.environ[variable]}" for variable in WAIT_VARIABLES if variable in os.environ]
    return " ".join(chosen) or "libgomp's default"


def quiet_lightning() -> None:
    """Every fit would repeat Lightning's device banner and its data-loader-workers hint: no news here."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=re.escape("The 'train_dataloader' does not have many workers"))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config([], args.overrides)
    check_comparable(cfg)
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    initial = LatentDiffusionModule.from_config(cfg)
    count = args.warmup_steps + args.steps
    batches = in_memory_batches(cfg, initial.tokenizer, count)
    images = sum(len(batch["caption"]) for batch in batches[args.warmup_steps :])
    device = lightning_trainer(cfg, count, []).strategy.root_device
    print(
        f"model: default config + {args.overrides}\n"
        f"work: batch {cfg.data.batch_size}, {cfg.data.resolution} px, trainable {list(cfg.model.trainable)},"
        f" {args.steps} timed steps after {args.warmup_steps} warm-up, {args.repeats} repeats alternating "
        f"ours/plain; device {device}, torch threads {torch.get_num_threads()}, OpenMP waiting: {openmp_waiting()}\n"
        "identical work: EMA off, frozen-text-feature cache off (train.use_ema=false, "
        "train.text_feature_cache_size=0), no validation, logger/checkpointing/progress bar off; same "
        f"batches, seed, initial weights, AdamW, warm-up, gradient clipping {cfg.trainer.gradient_clip_val}"
    )
    prepare: dict[str, Callable[[], Callable[[], dict[str, float]]]] = {
        "ours": lambda: prepare_ours(initial, cfg, batches, args.warmup_steps),
        "plain": lambda: prepare_plain(initial, cfg, batches, args.warmup_steps, device),
    }
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    fit_overheads = []
    for repeat in range(args.repeats):
        order = ["ours", "plain"] if repeat % 2 == 0 else ["plain", "ours"]
        results = {}
        for side in order:
            run = prepare[side]()
            torch.manual_seed(cfg.seed)
            results[side] = run()
            rates[side].append(images / results[side]["seconds"])
        fit_overheads.append(results["ours"]["fit_overhead"])
        print(
            f"repeat {repeat + 1}/{args.repeats} ({order[0]} first): ours {rates['ours'][-1]:.2f} images/s, "
            f"plain {rates['plain'][-1]:.2f} images/s"
        )
    ours_rate, plain_rate = statistics.median(rates["ours"]), statistics.median(rates["plain"])
    print(f"ours  (LatentDiffusionModule + lightning.Trainer): {ours_rate:.2f} images/s (median)")
    print(f"plain (hand-written PyTorch loop, diffusers objective): {plain_rate:.2f} images/s (median)")
    print(f"ours, Trainer.fit start-up + teardown: {statistics.median(fit_overheads):.2f} s a run (untimed)")
    ratio = ours_rate / plain_rate
    if ratio < GOAL or args.profile:
        stats = {}
        for side in ("ours", "plain"):
            run = prepare[side]()
            torch.manual_seed(cfg.seed)
            stats[side] = profile(run)
        print_where_time_goes(stats["ours"], stats["plain"])
    print(f"ratio ours/plain: {ratio:.2f} (median of {args.repeats} repeats; goal >= {GOAL})")


if __name__ == "__main__":
    main()
