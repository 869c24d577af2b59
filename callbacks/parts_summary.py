"""One line per training stage in place of Lightning's model summary table.

That table's FLOPs column reads 0 (Lightning counts FLOPs only for a module with an ``example_input_array``), and
its "Modules in eval mode: 616", with Lightning's "Found 616 module(s) in eval mode" warning, reads like a fault: the
frozen parts (VAE, text encoder) and the EMA copies stay in eval mode on purpose (no dropout; they never update).
This line gives each part's parameters, whether they train, and its mode as training starts, and says so once.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn


def describe_part(name: str, part: nn.Module) -> str:
    """``unet 3.4 M trained (train mode)``, ``vae 242 K frozen (eval mode)``, or ``text_encoder 22.9 M of which
    147 K trained (train mode)`` when only some of a part's parameters train (adapters, or parameters the objective
    never reaches)."""
    total = sum(parameter.numel() for parameter in part.parameters())
    trained = sum(parameter.numel() for parameter in part.parameters() if parameter.requires_grad)
    if trained == 0:
        role = "frozen"
    elif trained == total:
        role = "trained"
    else:
        role = f"of which {get_human_readable_count(trained)} trained"
    return f"{name} {get_human_readable_count(total)} {role} ({'train' if part.training else 'eval'} mode)"


class PartsSummary(L.Callback):
    """``[<stage>] parts: ...`` for the module's direct children with parameters, once per fit, at the first epoch's
    start: after the module's own ``on_train_start`` has set the modes the steps run in."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._said = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._said:
            return
        self._said = True
        parts = [
            (name, child) for name, child in pl_module.named_children() if next(child.parameters(), None) is not None
        ]
        frozen_in_eval = any(
            not child.training and not any(parameter.requires_grad for parameter in child.parameters())
            for _, child in parts
        )
        note = "; the frozen ones are in eval mode on purpose" if frozen_in_eval else ""
        rank_zero_info(f"[{self.stage}] parts: {'; '.join(describe_part(*part) for part in parts)}{note}")
