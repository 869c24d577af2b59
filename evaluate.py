"""Evaluate a trained model (a run's checkpoint or a diffusers pipeline folder) outside training.

    python evaluate.py grounding --model runs/frozen_text_encoder/<run>/checkpoints/last.ckpt --out eval/grounding
    python evaluate.py fidelity  --model runs/frozen_text_encoder/<run>/pipeline --out eval/fidelity

Each subcommand is defined beside the code it runs; this script only dispatches. Both run on ``--device``
(default: cuda when available, else cpu; a device that cannot be used here is refused before anything loads).
"""

from __future__ import annotations

import os

import configs.process_defaults  # noqa: F401  (on import, before torch loads: OpenMP waiting, known noise)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/diffusers are imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
from collections.abc import Sequence

from grounding.evaluation import register as register_grounding
from metrics.fidelity_evaluation import register as register_fidelity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True)
    register_grounding(subcommands)
    register_fidelity(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
