"""A run's checkpoint loaded for evaluation: the EMA weights become the parts, and only one set is held."""

import torch
from omegaconf import OmegaConf

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module


def test_a_checkpoint_loads_with_its_ema_weights_as_the_parts(tiny_overrides, tmp_path):
    cfg = load_config([], [*tiny_overrides, "train.ema_decay=0.5"])
    trained = LatentDiffusionModule.from_config(cfg)
    with torch.no_grad():  # two fake optimizer steps: training and EMA weights part ways
        for _ in range(2):
            for parameter in trained.unet.parameters():
                parameter.add_(0.1)
            trained.ema.step({"unet": trained.unet})
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")

    module, _ = load_diffusion_module(run / "checkpoints" / "last.ckpt")
    assert module.ema is None and not module.training
    assert module.evaluation_parts().denoiser is module.unet
    for name, parameter in module.unet.named_parameters():
        assert torch.equal(parameter, checkpoint["ema"]["weights"][f"unet.{name}"]), name
    assert any(not torch.equal(p, q) for p, q in zip(module.unet.parameters(), trained.unet.parameters(), strict=True))
    held = sum(p.numel() for p in module.parameters())
    assert held == sum(
        p.numel() for name in ("unet", "vae", "text_encoder") for p in getattr(module, name).parameters()
    )
