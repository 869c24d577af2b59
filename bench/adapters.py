"""What LoRA adapters save against full training of the same part: step time, peak memory, checkpoint size.

Per part, two variants of the default model that differ only in how that part trains:

- UNet: ``frozen_text_encoder`` (the UNet fully trained) against ``lora_unet`` (its attention adapted);
- text encoder: ``learnable_text_encoder`` against ``lora_text_encoder`` (the UNet fully trained in both).

Each variant runs in a fresh process (peak memory is per process): ``LatentDiffusionModule.from_config`` from the
preset, ``Trainer.fit`` over in-memory batches of random images with distinct captions, as train.py trains (AdamW,
EMA, clipping). Step time: median over the steps after the warm-up. Peak memory: the process's peak RSS during fit
(``sd2_shape.PeakMemory``) above its resting RSS once the module is built, beside the fixed training state that
``training_memory.py`` counts (gradient, AdamW moments and EMA: 16 bytes per trained parameter). Checkpoint: the
size of the file ``trainer.save_checkpoint`` writes (trained weights, their EMA and AdamW state only).

    python bench/adapters.py                    # the default model (random VAE): batch 16, 64 px, 12 steps
    python bench/adapters.py --quick            # seconds: batch 2, 32 px, 3 steps (the test runs this)
    python bench/adapters.py --threads 1 model.adapters.unet.rank=16   # config overrides for every variant
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import sd2_shape
import torch
from real_shape_rehearsal import training_batches
from train_throughput import fill_from_preset, in_memory_loader, lightning_trainer
from training_memory import PER_TRAINED_BYTES

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule

PAIRS = {  # part -> (full training, LoRA) presets
    "unet": ("experiment/frozen_text_encoder", "experiment/lora_unet"),
    "text_encoder": ("experiment/learnable_text_encoder", "experiment/lora_text_encoder"),
}
FULL = {"steps": 12, "warmup_steps": 2, "batch_size": 16, "resolution": 64}
QUICK = {"steps": 3, "warmup_steps": 1, "batch_size": 2, "resolution": 32}
MIB = 2**20


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def measure_variant(preset: str, args: argparse.Namespace) -> dict:
    """Train one variant in this process; its step time, memory, trained parameters and checkpoint size."""
    sd2_shape.quiet_process(args.threads)
    sizes = [f"data.batch_size={args.batch_size}", f"data.resolution={args.resolution}"]
    cfg = load_config([preset], ["model.vae.pretrained=null", "trainer.accelerator=cpu", *args.overrides, *sizes])
    torch.manual_seed(cfg.seed)
    module = LatentDiffusionModule.from_config(cfg)
    batches = training_batches(args.warmup_steps + args.steps, args.batch_size, args.resolution)
    step_clock = sd2_shape.StepClock()
    trainer = lightning_trainer(cfg, len(batches), [step_clock])
    memory = sd2_shape.PeakMemory(torch.device("cpu"))
    resting = resident_bytes()
    memory.reset()
    trainer.fit(module, train_dataloaders=in_memory_loader(batches))
    peak = memory.peak_bytes()
    trained = sum(parameter.numel() for parameter in module.trainable_parameters())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "variant.ckpt"
        trainer.save_checkpoint(checkpoint)
        checkpoint_bytes = checkpoint.stat().st_size
    return {
        "preset": preset,
        "trained_parts": list(module.trainable),
        "adapted_parts": list(module.adapted),
        "trained_parameters": trained,
        "step_seconds": statistics.median(step_clock.seconds[args.warmup_steps :]),
        "peak_rss_above_resting_bytes": peak - resting,
        "training_state_bytes": sum(PER_TRAINED_BYTES.values()) * trained,
        "checkpoint_bytes": checkpoint_bytes,
    }


def run_variant(preset: str, argv: Sequence[str]) -> dict:
    """``measure_variant`` in a fresh process: peaks of earlier variants must not count."""
    command = [sys.executable, __file__, "--variant", preset, *argv]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare(rows: dict[str, dict]) -> list[dict]:
    """Per part, LoRA against full training: the ratios of step time, memory and checkpoint size."""
    comparisons = []
    for part, (full_preset, lora_preset) in PAIRS.items():
        full, lora = rows[full_preset], rows[lora_preset]
        comparisons.append(
            {
                "part": part,
                "full": full_preset,
                "lora": lora_preset,
                "step_time_ratio": lora["step_seconds"] / full["step_seconds"],
                "peak_memory_ratio": lora["peak_rss_above_resting_bytes"] / full["peak_rss_above_resting_bytes"],
                "trained_parameter_ratio": lora["trained_parameters"] / full["trained_parameters"],
                "checkpoint_size_ratio": lora["checkpoint_bytes"] / full["checkpoint_bytes"],
            }
        )
    return comparisons


def markdown(rows: dict[str, dict], comparisons: list[dict]) -> str:
    lines = [
        "| variant | trains (LoRA) | trained parameters | step s | peak RSS above resting | "
        "grad + AdamW + EMA | checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        full = [name for name in row["trained_parts"] if name not in row["adapted_parts"]]
        trains = " + ".join([*full, *(f"{name} (LoRA)" for name in row["adapted_parts"])])
        lines.append(
            f"| {row['preset'].removeprefix('experiment/')} | {trains} | {row['trained_parameters']:,} | "
            f"{row['step_seconds']:.3f} | {row['peak_rss_above_resting_bytes'] / MIB:.0f} MiB | "
            f"{row['training_state_bytes'] / MIB:.1f} MiB | {row['checkpoint_bytes'] / MIB:.2f} MiB |"
        )
    lines += ["", "| part | LoRA / full: step time | peak memory | trained parameters | checkpoint size |"]
    lines.append("|---|---|---|---|---|")
    for row in comparisons:
        lines.append(
            f"| {row['part']} | {row['step_time_ratio']:.2f}x | {row['peak_memory_ratio']:.2f}x | "
            f"{row['trained_parameter_ratio']:.4f}x | {row['checkpoint_size_ratio']:.4f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"seconds, for tests: {QUICK}")
    parser.add_argument("--steps", type=int, help=f"timed steps per variant (default {FULL['steps']})")
    parser.add_argument("--warmup-steps", type=int, help=f"untimed first steps (default {FULL['warmup_steps']})")
    parser.add_argument("--batch-size", type=int, help=f"images per step (default {FULL['batch_size']})")
    parser.add_argument("--resolution", type=int, help=f"image side in px (default {FULL['resolution']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a busy machine")
    parser.add_argument("--json", action="store_true", help="print the rows and ratios as JSON")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process of one variant
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every variant")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    fill_from_preset(args, QUICK if args.quick else FULL)
    if args.variant:
        print(json.dumps(measure_variant(args.variant, args)))
        return {}
    child_argv = [item for item in raw if item != "--json"]
    rows = {preset: run_variant(preset, child_argv) for pair in PAIRS.values() for preset in pair}
    result = {"rows": list(rows.values()), "comparisons": compare(rows)}
    print(json.dumps(result, indent=1) if args.json else markdown(rows, result["comparisons"]))
    return result


if __name__ == "__main__":
    main()
