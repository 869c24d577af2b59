"""Which torch device an offline evaluation runs on: ``--device`` of every ``evaluate.py`` subcommand.

In training the evaluations run wherever Lightning put the module; offline, the default is the GPU when there is
one (SD-2 grounding over all MS-CXR pairs takes days on a CPU), and a device that cannot be used here fails at
argument parsing, before any model is loaded.
"""

from __future__ import annotations

import argparse

import torch


def evaluation_device(requested: str | None = None) -> torch.device:
    """``requested`` (``cpu``, ``cuda``, ``cuda:1``, ...) checked to be usable here; None: CUDA when available."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"--device '{requested}' is not a torch device: expected e.g. cpu, cuda, cuda:1") from error
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch without CUDA asserts; a missing GPU index raises
        reason = str(error).splitlines()[0].split(". ")[0]
        raise ValueError(
            f"--device '{requested}' cannot be used on this machine ({reason}); "
            f"CUDA available: {torch.cuda.is_available()}, GPUs visible: {torch.cuda.device_count()}"
        ) from error
    return device


def _device_argument(text: str) -> torch.device:
    try:
        return evaluation_device(None if text == "auto" else text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: parsed into a usable ``torch.device`` (a bad one is a parser error naming it)."""
    parser.add_argument(
        "--device",
        type=_device_argument,
        default="auto",
        help="torch device for the model, images and metrics: cpu, cuda, cuda:1, ... (default: cuda when available)",
    )
