"""The loss over the samples of a batch that count, weighted by the ``loss_weight`` the data carries.

Why here: the exactly-once sampler (datamodules.sampling) marks the repeats that even out a DDP split with zero
loss weight; how a training step turns that weight into its loss belongs to the training code, so the autoencoder
and the diffusion module import it here rather than from the data room's sampler. It depends on torch alone.
"""

from __future__ import annotations

import torch


def counted_mean(per_sample: torch.Tensor, loss_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the counted samples of a batch (``loss_weight`` from DrawnDataset; None: all count).

    A batch of evening-out repeats only gives 0 with zero gradients, so its process still takes its DDP step.
    """
    if loss_weight is None:
        return per_sample.mean()
    loss_weight = loss_weight.to(per_sample)
    return (per_sample * loss_weight).sum() / loss_weight.sum().clamp_min(1.0)
