"""Which parameters of a trainable part the diffusion objective reaches, and so can train.

Why: DDP expects a gradient for every parameter that requires one, at every step, and stops at the first step
otherwise. A trainable part may hold parameters the objective never uses: BERT's pooler (the UNet reads the
token features, ``output[0]``, never the pooled one), the VAE's decoder and post-quant convolution (the objective
only encodes). Rather than ``find_unused_parameters=True`` (a graph traversal every step), such parameters are
found once, by one probe forward and backward of the part's path in the objective on a tiny input, and left
out of training. A probe rather than a list of names, so the rule holds for any encoder architecture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_modules.adapters import check_adapters_reached
from lightning_modules.components import vae_downsampling_factor

if TYPE_CHECKING:
    from lightning_modules.latent_diffusion import LatentDiffusionModule


def unreached_parameters(part: nn.Module, objective_path: Callable[[], torch.Tensor]) -> list[str]:
    """Names of ``part``'s parameters that require grad yet get no gradient from ``objective_path()``.

    The probe runs the forward that trains: ``part`` in train mode (where transformers checkpoints its layers, and a
    reentrant checkpoint can cut adapters off), with gradient checkpointing as configured, gradients enabled. It
    leaves no trace: the mode, the buffers (norm statistics) and the random states of the CPU and the part's CUDA
    devices (dropout draws) are restored, so building a module draws nothing from the training's RNG.
    Reachability is what DDP checks: a parameter reached with a zero gradient still counts as used.
    """
    named = [(name, parameter) for name, parameter in part.named_parameters() if parameter.requires_grad]
    if not named:
        return []
    was_training = part.training
    buffers = {name: buffer.clone() for name, buffer in part.named_buffers()}
    gradients = [parameter.grad for _, parameter in named]
    cuda_devices = sorted({p.device.index or 0 for p in part.parameters() if p.device.type == "cuda"})
    part.train()
    try:
        for _, parameter in named:
            parameter.grad = None
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode(False), torch.enable_grad():
            output = objective_path()
            if output.requires_grad:  # else it depends on none of them
                # backward as training does, not autograd.grad: a reentrant checkpoint only accumulates into .grad
                output.float().sum().backward()
        return [name for name, parameter in named if parameter.grad is None]
    finally:
        part.train(was_training)
        for (_, parameter), gradient in zip(named, gradients, strict=True):
            parameter.grad = gradient
        with torch.no_grad():
            for name, buffer in part.named_buffers():
                if buffer.is_meta:  # a meta module (FLOP counts) holds no values to restore
                    continue
                if not torch.equal(buffer, buffers[name]):  # copying into every buffer would hit expanded views
                    buffer.copy_(buffers[name])


def freeze_unreached(module: LatentDiffusionModule) -> list[str]:
    """Parameters of a module's trainable parts that get no gradient from the objective (BERT's pooler, the VAE's
    decoder) stop requiring grad: not optimized, not averaged, and DDP never waits for them.

    Probed on a short caption and a latent-pixel-sized image; the denoiser is not probed, its whole output is the
    prediction. An adapted part must have some adapter reached. Returns the frozen parameters' names
    ("text_encoder.pooler.dense.weight", ...).
    """
    size = vae_downsampling_factor(module.vae)
    vae = module.vae
    image = torch.zeros(1, vae.config.in_channels, size, size, dtype=vae.dtype, device=vae.device)
    objective_paths = {  # what encode_text (never cached when trained) and encode_images run
        "text_encoder": lambda: module._run_text_encoder(["a"]),
        "vae": lambda: module.encode_images(image),
    }
    frozen = []
    for name in (name for name in module.trainable if name in objective_paths):
        part = getattr(module, name)
        unreached = unreached_parameters(part, objective_paths[name])
        if name in module.adapted:
            check_adapters_reached(name, part, unreached)
        elif len(unreached) == sum(parameter.requires_grad for parameter in part.parameters()):
            raise RuntimeError(f"the objective reaches none of the trainable {name}'s parameters")
        for parameter_name in unreached:
            part.get_parameter(parameter_name).requires_grad_(False)
            frozen.append(f"{name}.{parameter_name}")
    if frozen:
        modules = Counter(".".join(name.split(".")[:2]) for name in frozen)
        listed = ", ".join(f"{module_name} ({count} tensors)" for module_name, count in modules.items())
        rank_zero_info(f"[model] not trained, the objective never uses them: {listed}")
    return frozen
