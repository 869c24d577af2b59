"""Which parameters of a trainable part the diffusion objective reaches, and so can train.

Why: DDP expects a gradient for every parameter that requires one, at every step, and stops at the first step
otherwise. A trainable part may hold parameters the objective never uses: BERT's pooler (the UNet reads the
token features, ``output[0]``, never the pooled one), the VAE's decoder and post-quant convolution (the objective
only encodes). Rather than ``find_unused_parameters=True`` (a graph traversal every step), such parameters are
found once, by one probe forward and backward of the part's path in the objective on a tiny input, and left
out of training. A probe rather than a list of names, so the rule holds for any encoder architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def unreached_parameters(part: nn.Module, objective_path: Callable[[], torch.Tensor]) -> list[str]:
    """Names of ``part``'s parameters that require grad yet get no gradient from ``objective_path()``.

    The probe runs with ``part`` in eval mode (no dropout draw, no norm statistics updated), gradients enabled,
    and the CPU random state restored afterwards, so building a module draws nothing from the training's RNG.
    Reachability is what DDP checks: a parameter reached with a zero gradient still counts as used.
    """
    named = [(name, parameter) for name, parameter in part.named_parameters() if parameter.requires_grad]
    if not named:
        return []
    was_training = part.training
    part.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            output = objective_path()
            if not output.requires_grad:
                raise RuntimeError(f"the objective path of {type(part).__name__} does not depend on its parameters")
            gradients = torch.autograd.grad(
                output.float().sum(), [parameter for _, parameter in named], allow_unused=True
            )
    finally:
        part.train(was_training)
    return [name for (name, _), gradient in zip(named, gradients, strict=True) if gradient is None]
