"""The diffusion stage's AdamW runs as one foreach call per operation: the same arithmetic, element by element, as
the per-tensor loop torch uses on CPUs by default (and the diffusers example with it), so training is bit-identical,
only faster with hundreds of parameter tensors."""

import torch

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule


def test_foreach_adamw_steps_equal_the_per_tensor_loop_bit_for_bit(tiny_training_overrides):
    cfg = load_config([], [*tiny_training_overrides, "train.lr_warmup_steps=0"])
    module = LatentDiffusionModule.from_config(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["foreach"] is True
    parameters = module.trainable_parameters()
    twins = [parameter.detach().clone().requires_grad_(True) for parameter in parameters]
    before = [parameter.detach().clone() for parameter in parameters]
    loop = torch.optim.AdamW(
        [{"params": twins, "lr": optimizer.param_groups[0]["lr"]}],
        betas=module.adam_betas,
        weight_decay=module.adam_weight_decay,
        foreach=False,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for parameter, twin in zip(parameters, twins, strict=True):
            parameter.grad = torch.randn(parameter.shape, generator=generator)
            twin.grad = parameter.grad.clone()
        optimizer.step()
        loop.step()
    assert all(torch.equal(parameter, twin) for parameter, twin in zip(parameters, twins, strict=True))
    assert not any(torch.equal(parameter, old) for parameter, old in zip(parameters, before, strict=True))
