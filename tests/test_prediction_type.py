"""model.prediction_type: null follows the pretrained scheduler; an explicit type wins with a warning; training,
sampling and the exported pipeline all use the same one."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from configs import load_config
from lightning_modules.components import build_noise_scheduler, sampling_scheduler
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.test_latent_diffusion import CAPTIONS
from tests.test_precision import Recorder, fp32_reference


def model_folder_predicting(tiny_model_dir: Path, folder: Path, prediction_type: str) -> Path:
    """A copy of the tiny pipeline folder whose scheduler_config.json says ``prediction_type``."""
    shutil.copytree(tiny_model_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": prediction_type}))
    return folder


def module_for(tiny_overrides: list[str], folder: Path, *extra: str) -> LatentDiffusionModule:
    cfg = load_config([], [*tiny_overrides, f"model.pretrained={folder}", *extra])
    return LatentDiffusionModule.from_config(cfg)


def training_target(module: LatentDiffusionModule, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, ...]:
    """The target ``diffusion_loss`` regresses on, and the fp32 epsilon and v references for its draws."""
    recorder = Recorder(module, monkeypatch)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.diffusion_loss(latents, CAPTIONS, torch.Generator().manual_seed(1))
    ((_, timesteps),) = recorder.unet_inputs
    noise = recorder.loss_noises[0]
    alpha_bar = module.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    _, expected = fp32_reference(module, latents, noise, timesteps)
    return recorder.targets[-1], expected, noise, velocity


def test_a_v_prediction_model_trains_samples_and_exports_on_v_by_default(
    tiny_overrides, tiny_model_dir, tmp_path, monkeypatch
):
    folder = model_folder_predicting(tiny_model_dir, tmp_path / "v-model", "v_prediction")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="model.prediction_type")  # following it is no override
        module = module_for(tiny_overrides, folder)
    assert load_config([], tiny_overrides).model.prediction_type is None  # the default
    assert module.noise_scheduler.config.prediction_type == "v_prediction"

    target, expected, noise, velocity = training_target(module, monkeypatch)
    torch.testing.assert_close(target, velocity, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(target, noise)

    assert module.pipeline().scheduler.config.prediction_type == "v_prediction"
    assert sampling_scheduler(module.noise_scheduler).config.prediction_type == "v_prediction"  # grounding's
    exported = module.export_pipeline(tmp_path / "pipeline")
    scheduler_config = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == "v_prediction"


@pytest.mark.parametrize(("pretrained", "explicit"), [("v_prediction", "epsilon"), ("epsilon", "v_prediction")])
def test_an_explicit_prediction_type_overrides_the_pretrained_one_with_a_warning(
    tiny_overrides, tiny_model_dir, tmp_path, monkeypatch, pretrained, explicit
):
    folder = model_folder_predicting(tiny_model_dir, tmp_path / "model", pretrained)
    with pytest.warns(UserWarning, match=f"model.prediction_type={explicit} overrides the pretrained .*'{pretrained}'"):
        module = module_for(tiny_overrides, folder, f"model.prediction_type={explicit}")
    assert module.noise_scheduler.config.prediction_type == explicit
    target, expected, noise, velocity = training_target(module, monkeypatch)
    torch.testing.assert_close(target, noise if explicit == "epsilon" else velocity, rtol=1e-6, atol=1e-6)
    exported = module.export_pipeline(tmp_path / "pipeline")
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == explicit


def test_a_schedule_built_from_config_predicts_epsilon_unless_set():
    cfg = load_config()
    assert build_noise_scheduler(cfg.model.scheduler, None, None).config.prediction_type == "epsilon"
    built = build_noise_scheduler(cfg.model.scheduler, None, "v_prediction")
    assert built.config.prediction_type == "v_prediction"


def test_an_unsupported_pretrained_prediction_type_is_refused(tiny_overrides, tiny_model_dir, tmp_path):
    folder = model_folder_predicting(tiny_model_dir, tmp_path / "sample-model", "sample")
    with pytest.raises(ValueError, match="predicts 'sample'.*set model.prediction_type"):
        module_for(tiny_overrides, folder)
    with pytest.warns(UserWarning, match="overrides the pretrained scheduler's 'sample'"):
        module = module_for(tiny_overrides, folder, "model.prediction_type=epsilon")
    assert module.noise_scheduler.config.prediction_type == "epsilon"
