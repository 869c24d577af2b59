"""Per-GPU memory of training SD-2 base under DDP: why DDP with gradient checkpointing is the supported way.

Under DDP every GPU holds a whole replica: the fp32 weights of every part (4 bytes per parameter), and for each
trained parameter an fp32 gradient, AdamW's two fp32 moments and the fp32 EMA copy (16 bytes more). Parameters
are counted exactly: SD-2 base is built from its published configuration on the meta device (``bench/sd2_shape.py``:
no memory, nothing downloaded) and the trained ones are those the project's module trains
(``LatentDiffusionModule.trainable_parameters``) for each paper variant. Activations come on top: bf16 under
``bf16-mixed``, growing with the per-GPU batch and resolution; gradient checkpointing keeps only block inputs
and recomputes the rest (``bench/real_shape_rehearsal.py`` measures peaks). Sharding (FSDP) would only pay off
once this fixed state approached a GPU's memory.

    python bench/training_memory.py            # SD-2 base: table in GiB against 80 GiB A100 / H100
    python bench/training_memory.py --quick    # SD-2's structure at tiny widths (the test runs this)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import sd2_shape

from configs import load_config

GPU_GIB = 80  # A100 80GB and H100 80GB: 80 GiB each
WEIGHT_BYTES = 4  # fp32 weights (bf16-mixed keeps fp32 master weights; autocast casts per layer)
PER_TRAINED_BYTES = {"gradients": 4, "adamw_moments": 8, "ema": 4}
GIB = 2**30


def variant_memory(shape: sd2_shape.Shape, variant: str) -> dict:
    """Parameter counts and fixed per-GPU bytes of one paper variant under DDP."""
    cfg = load_config([sd2_shape.SD2_PRESET, sd2_shape.VARIANTS[variant]], ["model.pretrained=meta"])
    module = sd2_shape.meta_module(shape, 512, variant, cfg)
    parts = {name: sd2_shape.parameter_count(getattr(module, name)) for name in ("unet", "text_encoder", "vae")}
    trained = sum(parameter.numel() for parameter in module.trainable_parameters())
    state = {"weights": WEIGHT_BYTES * sum(parts.values())}
    state |= {name: size * trained for name, size in PER_TRAINED_BYTES.items()}
    return {
        "variant": variant,
        "trained_parts": list(module.trainable),
        "parameters": parts,
        "trained_parameters": trained,
        "bytes": state,
        "total_bytes": sum(state.values()),
    }


def markdown(rows: list[dict], shape: sd2_shape.Shape) -> str:
    counts = rows[0]["parameters"]
    lines = [
        f"Parameters of {shape.name}: UNet {counts['unet']:,}, text encoder {counts['text_encoder']:,}, "
        f"VAE {counts['vae']:,}.",
        "",
        "| variant | trained parameters | weights | gradients | AdamW moments | EMA | total per GPU | of 80 GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row['bytes'][name] / GIB:.1f} GiB" for name in ("weights", *PER_TRAINED_BYTES)]
        share = row["total_bytes"] / (GPU_GIB * GIB)
        lines.append(
            f"| {row['variant']} ({' + '.join(row['trained_parts'])}) | {row['trained_parameters']:,} | "
            f"{' | '.join(cells)} | {row['total_bytes'] / GIB:.1f} GiB | {share:.0%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SD-2's structure at tiny widths")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    shape = sd2_shape.TINY if args.quick else sd2_shape.SD2
    rows = [variant_memory(shape, variant) for variant in sd2_shape.VARIANTS]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, shape))
    return rows


if __name__ == "__main__":
    main()
