"""Gradient checkpointing of the UNet and the text encoder that trains LoRA adapters whatever the library versions.

Why: a reentrant checkpoint (torch's ``use_reentrant=True``) returns outputs that require no grad when none of its
tensor inputs does, and the parameters inside the checkpointed block then get no gradient. An adapted part is that
case: its base weights, input layer included, are frozen and its input (token ids, noisy latents) requires no grad,
so the adapters in its checkpointed blocks would silently not train on one process, and stop DDP as unused
parameters. transformers 4.x checkpoints reentrant by default and hooks the input embeddings only for adapters
loaded through its own ``load_adapter`` (not peft's ``inject_adapter_in_model``, which ``adapters.add_lora`` uses);
transformers 5 and diffusers checkpoint non-reentrant.

So every part is checkpointed non-reentrant explicitly, and an adapted part's input layer also hands on an output
that requires grad (what transformers' ``enable_input_require_grads`` does to input embeddings), which keeps the
adapters training under a model or library version that checkpoints reentrant anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from diffusers import ModelMixin
from torch import nn
from transformers import PreTrainedModel

NON_REENTRANT = {"use_reentrant": False}


def checkpointed_call(function: Callable, *args, **kwargs):
    """diffusers' ``gradient_checkpointing_func``: one block, its activations recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(function, *args, **NON_REENTRANT, **kwargs)


def _output_requires_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook on a frozen input layer (module-level, so that a hooked part still pickles)."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def enable_gradient_checkpointing(part: nn.Module, adapted: bool, input_layer: nn.Module | None = None) -> None:
    """Checkpoint ``part`` (a diffusers model or a transformers encoder) non-reentrant; ``adapted``: it trains
    LoRA adapters on frozen base weights, and its input layer's output is made to require grad too (a text
    encoder's token embeddings; a denoiser's is ``input_layer``, which its backbone names)."""
    if isinstance(part, ModelMixin):
        part.enable_gradient_checkpointing(checkpointed_call)
    elif hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated
        part.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    else:
        part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    if adapted:
        layer = part.get_input_embeddings() if isinstance(part, PreTrainedModel) else input_layer
        layer.register_forward_hook(_output_requires_grad)
