"""Per-GPU memory of training under DDP: SD-2 base (why DDP with gradient checkpointing is the supported way for it)
and PixArt-Σ 512 with T5-XXL (where training the text encoder outgrows an 80 GB GPU).

Under DDP every GPU holds a whole replica: the fp32 weights of every part (4 bytes per parameter), and for each
trained parameter an fp32 gradient, AdamW's two fp32 moments and the fp32 EMA copy (16 bytes more). Parameters
are counted exactly, from the published configurations built on the meta device (no memory, nothing downloaded):
SD-2 base from ``bench/sd2_shape.py``, its trained parameters those the project's module trains
(``LatentDiffusionModule.trainable_parameters``) for each paper variant; PixArt-Σ 512 from
``bench/pixart_shape.py`` (transformer 610.9 M, T5-XXL encoder 4,762.3 M, SDXL VAE 83.7 M), trained parts those of
its variant presets (``experiment/pixart_frozen_text_encoder``: the transformer; ``..._learnable_...``: the
transformer and the text encoder). For PixArt the
frozen parts' weights are counted both in fp32 (as the project holds them) and in bf16 (half: what a frozen
T5-XXL would take if cast, as PixArt's own training loads it). Activations come on top: bf16 under
``bf16-mixed``, growing with the per-GPU batch and resolution; gradient checkpointing keeps only block inputs
and recomputes the rest (``bench/real_shape_rehearsal.py`` measures peaks). Sharding (FSDP, issue #22) pays off
once this fixed state approaches a GPU's memory.

    python bench/training_memory.py                      # SD-2 base: table in GiB against 80 GiB A100 / H100
    python bench/training_memory.py --backbone pixart    # PixArt-Σ 512 + T5-XXL, against 80 GiB and H200's 141 GB
    python bench/training_memory.py --quick              # tiny widths of either structure (the tests run this)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import pixart_shape
import sd2_shape
import torch

GPU_GIB = 80  # A100 80GB and H100 80GB: 80 GiB each
H200_BYTES = 141e9  # NVIDIA H200: 141 GB of HBM3e
WEIGHT_BYTES = 4  # fp32 weights (bf16-mixed keeps fp32 master weights; autocast casts per layer)
PER_TRAINED_BYTES = {"gradients": 4, "adamw_moments": 8, "ema": 4}
FROZEN_WEIGHT_BYTES = {"fp32": 4, "bf16": 2}
GIB = 2**30
LABELS = {"unet": "UNet", "transformer": "transformer", "text_encoder": "text encoder", "vae": "VAE"}


def fixed_state(parameters: dict[str, int], trained: int, frozen_weight_bytes: int = WEIGHT_BYTES) -> dict[str, int]:
    """Bytes per GPU: fp32 weights of the trained parameters, ``frozen_weight_bytes`` for the others, and the
    gradient, moments and EMA of the trained ones."""
    frozen = sum(parameters.values()) - trained
    state = {"weights": WEIGHT_BYTES * trained + frozen_weight_bytes * frozen}
    return state | {name: size * trained for name, size in PER_TRAINED_BYTES.items()}


def row(variant: str, parts: list[str], parameters: dict[str, int], trained: int, frozen_weights: str) -> dict:
    state = fixed_state(parameters, trained, FROZEN_WEIGHT_BYTES[frozen_weights])
    return {
        "variant": variant,
        "trained_parts": parts,
        "frozen_weights": frozen_weights,
        "parameters": parameters,
        "trained_parameters": trained,
        "bytes": state,
        "total_bytes": sum(state.values()),
    }


def variant_memory(shape: sd2_shape.Shape, variant: str) -> dict:
    """Parameter counts and fixed per-GPU bytes of one SD-2 paper variant under DDP."""
    module = sd2_shape.meta_module(shape, 512, variant, gradient_checkpointing=False)
    parameters = {name: sd2_shape.parameter_count(getattr(module, name)) for name in ("unet", "text_encoder", "vae")}
    trained = sum(parameter.numel() for parameter in module.trainable_parameters())
    return row(variant, list(module.trainable), parameters, trained, "fp32")


def pixart_rows(shape: pixart_shape.Shape) -> list[dict]:
    """Both variants with frozen weights in fp32 and in bf16."""
    with torch.device("meta"):
        parts = {
            "transformer": pixart_shape.build_transformer(shape, 512),
            "text_encoder": pixart_shape.build_text_encoder(shape, tokenizer_size=64),
            "vae": pixart_shape.build_vae(shape, 512),
        }
    parameters = {name: sd2_shape.parameter_count(part) for name, part in parts.items()}
    return [
        row(variant, trained, parameters, sum(parameters[name] for name in trained), frozen_weights)
        for variant in pixart_shape.VARIANTS
        for trained in [pixart_shape.trained_parts(variant)]
        for frozen_weights in FROZEN_WEIGHT_BYTES
    ]


def markdown(rows: list[dict], model: str) -> str:
    """SD-2 rows: one column against 80 GiB; PixArt rows: the frozen weights' precision and a column for H200."""
    pixart = "transformer" in rows[0]["parameters"]
    counts = ", ".join(f"{LABELS[name]} {count:,}" for name, count in rows[0]["parameters"].items())
    header = "| variant | trained parameters | weights | gradients | AdamW moments | EMA | total per GPU | of 80 GiB |"
    if pixart:
        header = header.replace("| trained parameters", "| frozen weights | trained parameters") + " of 141 GB |"
    lines = [f"Parameters of {model}: {counts}.", "", header, "|" + "---|" * (header.count("|") - 1)]
    for entry in rows:
        cells = [f"{entry['bytes'][name] / GIB:.1f} GiB" for name in ("weights", *PER_TRAINED_BYTES)]
        total = entry["total_bytes"]
        precision = f"{entry['frozen_weights']} | " if pixart else ""
        line = (
            f"| {entry['variant']} ({' + '.join(entry['trained_parts'])}) | {precision}{entry['trained_parameters']:,} "
            f"| {' | '.join(cells)} | {total / GIB:.1f} GiB | {total / (GPU_GIB * GIB):.0%} |"
        )
        lines.append(line + (f" {total / H200_BYTES:.0%} |" if pixart else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("unet", "pixart"), default="unet", help="SD-2 base or PixArt-Σ 512")
    parser.add_argument("--quick", action="store_true", help="the backbone's structure at tiny widths")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.backbone == "pixart":
        shape = pixart_shape.TINY if args.quick else pixart_shape.SIGMA
        rows = pixart_rows(shape)
    else:
        shape = sd2_shape.TINY if args.quick else sd2_shape.SD2
        rows = [variant_memory(shape, variant) for variant in sd2_shape.VARIANTS]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, shape.name))
    return rows


if __name__ == "__main__":
    main()
