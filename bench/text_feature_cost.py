"""Should shards also store text-encoder features? What a frozen text encoder costs per training sample, against the
UNet's training step, and what storing its output would cost on disk, for the default model and for SD 2 base.

    python bench/text_feature_cost.py

FLOPs are counted by torch's FlopCounterMode on the meta device (no weights, no arithmetic: seconds, any model
size): the text encoder's forward for one 77-token caption, the UNet's forward + backward for one image. Bytes
per sample: the encoder's last hidden state (77 x hidden, fp16), the VAE posterior stored by
``datamodules.prepare --latents`` (fp32 mean + log-variance) and the 8-bit PNG at the model's resolution
(incompressible upper bound; real PNGs are smaller).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

TOKENS = 77

# The default config's UNet at 64 px (16x16 latents) with all-MiniLM-L6-v2, and SD 2 base at 512 px with its
# OpenCLIP ViT-H text tower: architectures as published in their config files.
MODELS = {
    "default (MiniLM, UNet [32,64,128], 64 px)": {
        "text": BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        ),
        "unet": {
            "sample_size": 16,
            "block_out_channels": (32, 64, 128),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "cross_attention_dim": 384,
        },
        "resolution": 64,
        "latent_channels": 4,
    },
    "SD 2 base (OpenCLIP ViT-H text, 512 px)": {
        "text": CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "layers_per_block": 2,
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
        },
        "resolution": 512,
        "latent_channels": 4,
    },
}


def text_encoder_flops(config) -> int:
    with torch.device("meta"):
        model = (BertModel if isinstance(config, BertConfig) else CLIPTextModel)(config).eval()
        tokens = torch.zeros(1, TOKENS, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    return counter.get_total_flops()


def unet_training_flops(unet_config: dict, hidden_size: int) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        size = unet_config["sample_size"]
        latents = torch.zeros(1, 4, size, size)
        text = torch.zeros(1, TOKENS, hidden_size)
        timestep = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(latents, timestep, text).sample.float().pow(2).mean().backward()
    return counter.get_total_flops()


def main() -> None:
    print(f"{'model':<44}{'text fwd GFLOP':>15}{'UNet train GFLOP':>18}{'text share':>12}")
    sizes = []
    for name, spec in MODELS.items():
        text = text_encoder_flops(spec["text"])
        unet = unet_training_flops(spec["unet"], spec["text"].hidden_size)
        print(f"{name:<44}{text / 1e9:>15.1f}{unet / 1e9:>18.1f}{text / (text + unet):>11.1%}")
        latent_side = spec["unet"]["sample_size"]
        sizes.append(
            (
                name,
                TOKENS * spec["text"].hidden_size * 2,
                2 * spec["latent_channels"] * latent_side**2 * 4,
                spec["resolution"] ** 2,
            )
        )
    print(f"\n{'bytes per sample':<44}{'text features':>15}{'latents':>18}{'PNG (max)':>12}")
    for name, text_bytes, latent_bytes, png_bytes in sizes:
        print(f"{name:<44}{text_bytes / 1024:>13.0f}KB{latent_bytes / 1024:>16.0f}KB{png_bytes / 1024:>10.0f}KB")


if __name__ == "__main__":
    main()
