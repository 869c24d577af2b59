"""How much a busy machine slows CPU training, per OpenMP / thread setting: the step time of the default run's
autoencoder stage with no competitor and with one CPU-bound competing process, and their ratio (busy / quiet).

    python bench/busy_machine.py              # batch 16 at 64 px (the autoencoder stage), 8 steps x 2 rounds
    python bench/busy_machine.py --quick      # seconds, for tests: batch 4 at 32 px, 1 step x 1 round

Why: on 2 cores with one other process running, libgomp's worker threads (torch's CPU wheels use GNU OpenMP)
spin at every barrier for the thread that the other process has taken the core from, and each step waits for
it. Each setting runs in a fresh process, because OpenMP reads its environment when the library starts; within
that process quiet and busy rounds alternate (a busy-loop subprocess is started and stopped around each busy
round), so a drift in the machine's other load reaches both alike. The current setting is what a process got
before the entry scripts set a default: torch's thread count (one per core) and OpenMP's default wait policy.
Candidates: OMP_WAIT_POLICY=PASSIVE (waiting threads sleep at once), a short GOMP_SPINCOUNT (spin briefly, then
sleep), one thread fewer than cores, and both. KMP_BLOCKTIME is not measured: it is Intel OpenMP's knob, which
torch's libgomp ignores. train.py, evaluate.py and study.py default to OMP_WAIT_POLICY=PASSIVE (results: README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from argparse import RawDescriptionHelpFormatter
from collections.abc import Callable, Sequence

import torch  # loads OpenMP with this process's environment, before train_throughput imports train.py's defaults
from train_throughput import fill_from_preset

from configs import load_config
from lightning_modules.autoencoder import AutoencoderModule
from lightning_modules.components import build_vae

FULL = {"steps": 8, "warmup_steps": 2, "rounds": 2, "batch_size": 16, "resolution": 64}
QUICK = {"steps": 1, "warmup_steps": 1, "rounds": 1, "batch_size": 4, "resolution": 32}
CORES = len(os.sched_getaffinity(0))  # the cores this process may run on (what OpenMP counts)
# The variables a setting controls: removed from the child's environment, then set as the setting says.
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# name: (environment, torch threads; None = torch's default, one per core)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "current": ({}, None),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "GOMP_SPINCOUNT=10000": ({"GOMP_SPINCOUNT": "10000"}, None),  # spin ~10 us (default 300000), then sleep
    f"threads {max(1, CORES - 1)}": ({}, max(1, CORES - 1)),
    f"PASSIVE + threads {max(1, CORES - 1)}": ({"OMP_WAIT_POLICY": "PASSIVE"}, max(1, CORES - 1)),
}
QUICK_SETTINGS = ("current", "OMP_WAIT_POLICY=PASSIVE")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help=f"timed steps per round (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed steps first (default {FULL['warmup_steps']})")
    parser.add_argument("--rounds", type=int, help=f"quiet/busy alternations (default {FULL['rounds']})")
    parser.add_argument("--batch-size", type=int, help=f"images per step (default {FULL['batch_size']})")
    parser.add_argument("--resolution", type=int, help=f"image side in px (default {FULL['resolution']})")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="default: all (quick: two)")
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}, {QUICK_SETTINGS}")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)  # one setting's process
    args = parser.parse_args(argv)
    fill_from_preset(args, QUICK if args.quick else FULL)
    if args.settings is None:
        args.settings = list(QUICK_SETTINGS if args.quick else SETTINGS)
    if min(args.steps, args.warmup_steps, args.rounds, args.batch_size) < 1 or args.resolution % 8:
        parser.error("--steps, --warmup-steps, --rounds and --batch-size must be >= 1, --resolution a multiple of 8")
    return args


def autoencoder_step(batch_size: int, resolution: int) -> Callable[[], None]:
    """One optimizer step of the default config's autoencoder stage (its VAE, loss and optimizer) on a fixed
    batch: the stage whose time a busy machine multiplied most."""
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the module logs to a trainer; none here
    cfg = load_config([], ["model.vae.pretrained=null", f"data.resolution={resolution}"])
    torch.manual_seed(0)
    ae = cfg.autoencoder
    module = AutoencoderModule(
        build_vae(cfg.model, resolution, None), ae.learning_rate, ae.kl_weight, ae.reconstruction_loss
    )
    optimizer = module.configure_optimizers()
    batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution) * 2 - 1}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    return step


def measure_setting(args: argparse.Namespace) -> dict:
    """In the setting's own process: per round, median step seconds quiet, then with a busy-loop competitor."""
    threads = SETTINGS[args.child][1]
    if threads is not None:
        torch.set_num_threads(threads)
    step = autoencoder_step(args.batch_size, args.resolution)
    for _ in range(args.warmup_steps):
        step()
    rounds: dict[str, list[float]] = {"quiet": [], "busy": []}
    for _ in range(args.rounds):
        for condition in rounds:
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
    return {"threads": torch.get_num_threads()} | rounds


def run_setting(name: str, args: argparse.Namespace) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in OPENMP_VARIABLES}
    environment |= SETTINGS[name][0]
    sizes = ["--steps", args.steps, "--warmup-steps", args.warmup_steps, "--rounds", args.rounds]
    sizes += ["--batch-size", args.batch_size, "--resolution", args.resolution]
    command = [sys.executable, __file__, "--child", name, *map(str, sizes)]
    child = subprocess.run(command, env=environment, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"setting {name!r} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"wait_policy": environment.get("OMP_WAIT_POLICY", "")}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_setting(args)))
        return
    load = os.getloadavg()[0]
    print(
        f"{CORES} cores, load average {load:.2f} at start; workload: autoencoder stage step (default model), "
        f"batch {args.batch_size}, {args.resolution} px, {args.steps} steps (+{args.warmup_steps} warm-up) "
        f"x {args.rounds} quiet/busy rounds; busy = one competing busy-loop process"
    )
    results = {name: run_setting(name, args) for name in args.settings}
    for name, result in results.items():
        quiet, busy = statistics.median(result["quiet"]), statistics.median(result["busy"])
        result |= {"quiet_s": quiet, "busy_s": busy}
        rounds = ", ".join(f"{q:.3f}/{b:.3f}" for q, b in zip(result["quiet"], result["busy"], strict=True))
        print(
            f"{name}: {result['threads']} threads, OMP_WAIT_POLICY {result['wait_policy'] or 'unset'}: "
            f"quiet {quiet:.3f} s/step, busy {busy:.3f} s/step -> busy/quiet {busy / quiet:.2f}x "
            f"(rounds quiet/busy: {rounds})"
        )
    current = results.get("current")
    for name, result in results.items():
        if current is None or name == "current":
            continue
        print(
            f"{name} / current: quiet {result['quiet_s'] / current['quiet_s']:.2f}x, "
            f"busy {result['busy_s'] / current['busy_s']:.2f}x step time"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
