"""Generation and export: the backbone's diffusers pipeline around a module's evaluation weights.

Every image the project scores (validation grids, FID, grounding while generating) comes from the pipeline users
load from the exported folder, so what is measured is what is shipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline

from lightning_modules.adapters import plain_copy, write_lora_weights, write_peft_adapters

if TYPE_CHECKING:
    from lightning_modules.latent_diffusion import LatentDiffusionModule


def module_pipeline(module: LatentDiffusionModule, **replaced_parts: torch.nn.Module) -> DiffusionPipeline:
    """The backbone's pipeline around the evaluation parts (no copies), with the backbone's sampler;
    ``replaced_parts`` (by part name, e.g. ``unet=...``) take the place of those parts."""
    parts = module.evaluation_parts()
    backbone = parts.backbone
    denoiser = replaced_parts.pop(backbone.part, parts.denoiser)
    for name, part in replaced_parts.items():
        setattr(parts, name, part)
    pipe = backbone.pipeline(denoiser, parts, backbone.sampling_scheduler(parts.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    module: LatentDiffusionModule,
    prompts: Sequence[str],
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    resolution: int | None,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Images in [0, 1], (N, 3, H, W), float32 on the CPU (see ``LatentDiffusionModule.sample``)."""
    pipe = module_pipeline(module)
    backbone = module.backbone
    size = resolution or getattr(pipe, backbone.part).config.sample_size * pipe.vae_scale_factor
    was_training = module.training
    module.eval()  # the training parts are the evaluation parts when no EMA is kept
    autocast = torch.autocast(module.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    try:
        with autocast:
            latents = pipe(
                list(prompts),
                height=size,
                width=size,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="latent",
                **backbone.generation_arguments(pipe.tokenizer),
            ).images
            images = [decode(pipe, latent[None]) for latent in latents]
    finally:
        module.train(was_training)
    return torch.cat(images)


def decode(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """As the pipeline decodes (scaling, VAE, post-processing to [0, 1]), moved to the CPU as float32."""
    decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pt").float().cpu()


def plain_pipeline(module: LatentDiffusionModule, merge: bool) -> DiffusionPipeline:
    """The pipeline with every adapted part as a plain model: adapters merged in, or left out (the base)."""
    parts = module.evaluation_parts()
    return module_pipeline(module, **{name: plain_copy(parts.part(name), merge) for name in module.adapted})


def export_pipeline(module: LatentDiffusionModule, folder: str | Path) -> Path:
    """Write the backbone's pipeline folder (the evaluation weights: EMA when kept) that diffusers loads;
    adapters are merged into their parts' weights (a plain pipeline, no peft needed)."""
    folder = Path(folder)
    plain_pipeline(module, merge=True).save_pretrained(folder, safe_serialization=True)
    return folder


def export_lora(module: LatentDiffusionModule, folder: str | Path) -> Path:
    """Write the adapters beside the base pipeline they load onto: the evaluation weights with the adapters left
    out. When only adapters train, the base is the model the run started from, so the adapter files alone load
    onto that model.

    The files take the form the backbone's pipeline loads: diffusers LoRA weights
    (``pytorch_lora_weights.safetensors``; ``from_pretrained(folder)`` then ``load_lora_weights(folder)``) where the
    pipeline has a LoRA loader (StableDiffusionPipeline); otherwise (PixArtSigmaPipeline, which diffusers gives
    none) peft adapter folders, ``<folder>/<part>_lora``, loaded with ``PeftModel.from_pretrained(pipe.<part>,
    folder / "<part>_lora")`` (``adapters.write_peft_adapters``). The run's merged pipeline (``export_pipeline``)
    needs neither.
    """
    if not module.adapted:
        raise ValueError("export_lora: this model has no adapters (model.adapters.parts is empty)")
    folder = Path(folder)
    plain_pipeline(module, merge=False).save_pretrained(folder, safe_serialization=True)
    parts = module.evaluation_parts()
    adapted = {name: parts.part(name) for name in module.adapted}
    pipeline_class = module.backbone.pipeline_class
    if hasattr(pipeline_class, "load_lora_weights"):
        return write_lora_weights(folder, adapted, pipeline_class)
    return write_peft_adapters(folder, adapted)
