"""Which OpenMP wait settings the entry scripts should use: every candidate's training step time on a quiet
machine and beside a competing CPU-bound process, in one run, with a recommendation and a verdict on the default.

    python bench/busy_machine.py              # autoencoder step (batch 16, 64 px) and diffusion step (batch 8,
                                              # 64 px, default model), 6 steps x 3 quiet/busy rounds per setting
    python bench/busy_machine.py model.pretrained=/models/tiny-sd   # the diffusion step on another model
    python bench/busy_machine.py --quick      # seconds, for tests: 3 settings, 32 px, 1 step x 1 round

Why: torch's CPU wheels use GNU OpenMP (libgomp), whose waiting threads spin, then sleep (see
configs/process_defaults.py). A long spin keeps a dedicated machine fast but, when another process holds a core,
spins on for a partner thread that is not running; sleeping at once (PASSIVE) is safe there but pays a wake-up at
every parallel region, which costs most on steps made of many small ops (a tiny model's). So two workloads are
measured: the autoencoder stage's convolutions, and a diffusion training step (LatentDiffusionModule's own step,
backward, gradient clipping, AdamW and EMA, with the text-feature cache on as train.py runs it).

Each setting runs in a fresh process (libgomp reads its environment once, when torch loads it), with the OpenMP
variables of this shell removed and the setting's own applied. Within that process quiet and busy rounds alternate
(one busy-loop process started and stopped around each busy round), so a drift in the machine's load reaches both.
Verdict per setting, from medians: "dedicated" is its quiet step time over the fastest setting's, "shared" its busy
step time over the best setting's. A setting passes when, on every workload, dedicated <= 1 + --quiet-slack and
shared <= --busy-limit; of those, the one best when shared (then when quiet) is recommended. The entry scripts'
default picks one setting when the CPUs are free at start and another when other processes keep them busy
(configs/process_defaults.py): it meets the limits when the first is within the quiet slack and the second within
the busy limit; "shared only later" is the first setting's busy ratio (load that arrives after the start). Run it
on a quiet machine: a "quiet" round is only as quiet as the machine. KMP_BLOCKTIME is not measured: it is Intel
OpenMP's knob, which torch's libgomp ignores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable, Sequence

import torch  # loads OpenMP with this process's environment; each setting is measured in a child process
from train_throughput import fill_from_preset

from configs import load_config
from configs.process_defaults import BUSY_CORES, WAIT_VARIABLES, WAITING_WHEN_BUSY, WAITING_WHEN_FREE
from lightning_modules.autoencoder import AutoencoderModule
from lightning_modules.components import build_vae
from lightning_modules.latent_diffusion import LatentDiffusionModule

FULL = {"steps": 6, "warmup_steps": 2, "rounds": 3, "resolution": 64, "autoencoder_batch": 16, "diffusion_batch": 8}
QUICK = {"steps": 1, "warmup_steps": 1, "rounds": 1, "resolution": 32, "autoencoder_batch": 4, "diffusion_batch": 2}
CORES = len(os.sched_getaffinity(0))  # the cores this process may run on (what OpenMP counts)
# Removed from a setting's environment before its own are applied: the caller's values must not leak in.
OPENMP_VARIABLES = (*WAIT_VARIABLES, "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# name: environment. libgomp's spin count is in iterations of a pause loop (tens of ns each on recent x86).
SETTINGS: dict[str, dict[str, str]] = {
    "unset": {},  # libgomp's default: spin 300,000 iterations, then sleep
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},  # spin (30 billion iterations)
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
}
QUICK_SETTINGS = ("unset", "OMP_WAIT_POLICY=PASSIVE", "OMP_WAIT_POLICY=ACTIVE")
WORKLOADS = ("autoencoder", "diffusion")
CONDITIONS = ("quiet", "busy")


def setting_name(environment: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in environment.items()) or "unset"


# What train.py, evaluate.py and study.py apply: one setting when the CPUs are free at start, another when busy.
ENTRY_WHEN_FREE, ENTRY_WHEN_BUSY = setting_name(WAITING_WHEN_FREE), setting_name(WAITING_WHEN_BUSY)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"timed steps per round (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    parser.add_argument("--rounds", type=int, help=f"quiet/busy alternations (default {FULL['rounds']})")
    parser.add_argument("--resolution", type=int, help=f"image side in px (default {FULL['resolution']})")
    parser.add_argument("--autoencoder-batch", type=int, help=f"default {FULL['autoencoder_batch']}")
    parser.add_argument("--diffusion-batch", type=int, help=f"default {FULL['diffusion_batch']}")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: all (quick: three)")
    parser.add_argument("--quiet-slack", type=float, default=0.05, help="dedicated loss allowed (default 0.05)")
    parser.add_argument("--busy-limit", type=float, default=1.25, help="shared / best shared allowed (default 1.25)")
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}, {QUICK_SETTINGS}")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)  # one setting's process
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the diffusion step's model")
    args = parser.parse_args(argv)
    fill_from_preset(args, QUICK if args.quick else FULL)
    if args.settings is None:
        args.settings = list(QUICK_SETTINGS if args.quick else SETTINGS)
    counts = (args.steps, args.warmup_steps, args.rounds, args.autoencoder_batch, args.diffusion_batch)
    if min(counts) < 1 or args.resolution % 8:
        parser.error("steps, rounds and batch sizes must be >= 1, --resolution a multiple of 8")
    return args


def autoencoder_step(args: argparse.Namespace) -> Callable[[], None]:
    """One optimizer step of the default config's autoencoder stage (its VAE, loss and optimizer) on a fixed batch:
    convolutions on 64 px images, few and large parallel regions."""
    cfg = load_config([], ["model.vae.pretrained=null", f"data.resolution={args.resolution}"])
    torch.manual_seed(0)
    ae = cfg.autoencoder
    module = AutoencoderModule(
        build_vae(cfg.model, args.resolution, None), ae.learning_rate, ae.kl_weight, ae.reconstruction_loss
    )
    optimizer = module.configure_optimizers()
    batch = {"pixel_values": torch.rand(args.autoencoder_batch, 3, args.resolution, args.resolution) * 2 - 1}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    return step


def diffusion_step(args: argparse.Namespace) -> Callable[[], None]:
    """One training step of the diffusion stage as Lightning runs it for train.py (without the Trainer's own
    bookkeeping): LatentDiffusionModule's step, backward, gradient clipping, AdamW, EMA; many small ops."""
    overrides = ["model.vae.pretrained=null", *args.overrides, f"data.resolution={args.resolution}"]
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    module = LatentDiffusionModule.from_config(cfg).train()
    optimizer = module.configure_optimizers()["optimizer"]
    parameters = module.trainable_parameters()
    prompts = list(cfg.sampling.validation_prompts)
    batch = {
        "pixel_values": torch.rand(args.diffusion_batch, 3, args.resolution, args.resolution) * 2 - 1,
        "caption": [prompts[index % len(prompts)] for index in range(args.diffusion_batch)],
    }
    trained = {name: getattr(module, name) for name in module.trainable}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.trainer.gradient_clip_val)
        optimizer.step()
        if module.ema is not None:
            module.ema.step(trained)

    return step


def time_rounds(step: Callable[[], None], args: argparse.Namespace) -> dict[str, list[float]]:
    """Per round, the median step seconds quiet, then beside a busy-loop competitor."""
    for _ in range(args.warmup_steps):
        step()
    rounds: dict[str, list[float]] = {condition: [] for condition in CONDITIONS}
    for _ in range(args.rounds):
        for condition in CONDITIONS:
            competitor = None
            if condition == "busy":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.3)  # let it start spinning
            seconds = []
            try:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    seconds.append(time.perf_counter() - start)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            rounds[condition].append(statistics.median(seconds))
    return rounds


def measure_setting(args: argparse.Namespace) -> dict:
    """In the setting's own process: each workload's rounds."""
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the modules log to a trainer; none here
    builders = {"autoencoder": autoencoder_step, "diffusion": diffusion_step}
    return {"threads": torch.get_num_threads()} | {
        name: time_rounds(builders[name](args), args) for name in args.workloads
    }


def run_setting(name: str, args: argparse.Namespace) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in OPENMP_VARIABLES}
    environment |= SETTINGS[name] | {"OMP_DISPLAY_ENV": "VERBOSE"}  # libgomp prints the spin count it took
    sizes = {
        "--steps": args.steps,
        "--warmup-steps": args.warmup_steps,
        "--rounds": args.rounds,
        "--resolution": args.resolution,
        "--autoencoder-batch": args.autoencoder_batch,
        "--diffusion-batch": args.diffusion_batch,
    }
    command = [sys.executable, __file__, "--child", name, "--workloads", *args.workloads]
    command += [str(part) for option in sizes.items() for part in option] + ["--", *args.overrides]
    child = subprocess.run(command, env=environment, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"setting {name!r} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    spin_count = re.search(r"^\s*GOMP_SPINCOUNT = '(\d+)'", child.stderr, re.M)
    if spin_count is None:
        raise RuntimeError(f"setting {name!r}: libgomp did not report its spin count:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"spin_count": int(spin_count.group(1))}


def verdicts(medians: dict[str, dict[str, dict[str, float]]], quiet_slack: float, busy_limit: float) -> dict:
    """Per setting and workload, step time over the best setting's, quiet ("dedicated") and busy ("shared");
    whether the setting passes on every workload, and the recommended one (None when none passes)."""
    workloads = next(iter(medians.values())).keys()
    best = {w: {c: min(m[w][c] for m in medians.values()) for c in CONDITIONS} for w in workloads}
    ratios = {
        name: {w: {c: per[w][c] / best[w][c] for c in CONDITIONS} for w in workloads} for name, per in medians.items()
    }
    passing = [
        name
        for name, per in ratios.items()
        if all(per[w]["quiet"] <= 1 + quiet_slack and per[w]["busy"] <= busy_limit for w in workloads)
    ]

    def worst(name: str, condition: str) -> float:
        return max(ratios[name][w][condition] for w in workloads)

    recommended = min(passing, key=lambda name: (worst(name, "busy"), worst(name, "quiet")), default=None)
    return {"ratios": ratios, "passing": passing, "recommended": recommended}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_setting(args)))
        return
    sizes = {"autoencoder": args.autoencoder_batch, "diffusion": args.diffusion_batch}
    print(
        f"{CORES} cores, load average {os.getloadavg()[0]:.2f} at start; {args.steps} steps "
        f"(+{args.warmup_steps} warm-up) x {args.rounds} quiet/busy rounds per workload, {args.resolution} px; "
        "busy = beside one busy-loop process; each setting in a fresh process"
    )
    print(
        "workloads: "
        + "; ".join(f"{w} step, batch {sizes[w]}" for w in args.workloads)
        + (f" (diffusion model: default + {args.overrides})" if args.overrides else "")
    )
    results = {name: run_setting(name, args) for name in args.settings}
    medians = {
        name: {w: {c: statistics.median(result[w][c]) for c in CONDITIONS} for w in args.workloads}
        for name, result in results.items()
    }
    judged = verdicts(medians, args.quiet_slack, args.busy_limit)
    for workload in args.workloads:
        print(f"\n{workload}: s/step quiet, busy; busy/quiet; dedicated = quiet / fastest, shared = busy / best")
        for name, result in results.items():
            quiet, busy = medians[name][workload]["quiet"], medians[name][workload]["busy"]
            ratio = judged["ratios"][name][workload]
            pairs = zip(result[workload]["quiet"], result[workload]["busy"], strict=True)
            rounds = ", ".join(f"{q:.4f}/{b:.4f}" for q, b in pairs)
            print(
                f"  {name} (libgomp spin count {result['spin_count']}): {result['threads']} threads: "
                f"quiet {quiet:.4f}, busy {busy:.4f}; {busy / quiet:.2f}x; "
                f"dedicated {ratio['quiet']:.3f}, shared {ratio['busy']:.3f} (rounds quiet/busy: {rounds})"
            )
    print(
        f"\npasses (dedicated <= {1 + args.quiet_slack:.2f} and shared <= {args.busy_limit:.2f} on every workload): "
        f"{', '.join(judged['passing']) or 'none'}"
    )
    recommended = judged["recommended"]
    if recommended is None:
        print("recommended: none of these settings passes; rerun on a quiet machine, or relax the limits")
    else:
        print(f"recommended: {recommended} (of the passing ones, the best when shared, then when quiet)")
    print(
        f"entry scripts' default (configs/process_defaults.py): {ENTRY_WHEN_FREE} when other processes use less "
        f"than {BUSY_CORES} cores at start, else {ENTRY_WHEN_BUSY}"
    )
    if {ENTRY_WHEN_FREE, ENTRY_WHEN_BUSY} <= judged["ratios"].keys():
        free, busy = judged["ratios"][ENTRY_WHEN_FREE], judged["ratios"][ENTRY_WHEN_BUSY]
        dedicated = max(free[w]["quiet"] for w in args.workloads)
        shared = max(busy[w]["busy"] for w in args.workloads)
        later = max(free[w]["busy"] for w in args.workloads)
        meets = dedicated <= 1 + args.quiet_slack and shared <= args.busy_limit
        print(
            f"  dedicated (free at start): {dedicated:.3f}; shared at start: {shared:.3f}; shared only later: "
            f"{later:.3f} -> {'meets' if meets else 'misses'} the limits"
            + ("" if meets else ": update configs/process_defaults.py")
        )
    else:
        print(f"  not judged: run with --settings including {ENTRY_WHEN_FREE} and {ENTRY_WHEN_BUSY}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
