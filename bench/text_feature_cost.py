"""Should shards also store text-encoder features? What a frozen text encoder costs per training sample, against the
UNet's training step, and what storing its output would cost on disk, for the default model and for SD 2 base.

    python bench/text_feature_cost.py
    python bench/text_feature_cost.py --quick    # seconds, for tests: the default model only

FLOPs are counted with torch's FLOP formulas (``counted_flops``) on the meta device (no weights, no arithmetic:
seconds, any model size): the text encoder's forward for one 77-token caption, the UNet's forward + backward for
one image. Bytes per sample: the encoder's last hidden state (77 x hidden, fp16), the VAE posterior stored by
``datamodules.prepare --latents`` (fp32 mean + log-variance) and the 8-bit PNG at the model's resolution
(incompressible upper bound; real PNGs are smaller).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from diffusers import UNet2DConditionModel
from sd2_shape import SD2_TEXT_ENCODER, SD2_UNET
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

Result = TypeVar("Result")

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
        "text": CLIPTextConfig(**SD2_TEXT_ENCODER),
        "unet": SD2_UNET,
        "resolution": 512,
        "latent_channels": 4,
    },
}


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs: the four products of attention's backward (twice the forward), as the meta device's math
    path counts them; the fused kernel also recomputes the scores, which torch's CUDA formulas count."""
    return 2 * sdpa_flop_count(query, key, value)


# torch's formulas (matrix products, convolutions, the CUDA attention kernels) and the CPU attention kernel, which
# torch's table lacks (CPU attention would count as 0 FLOPs).
FLOP_FORMULAS = flop_registry | {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_attention_flops),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_cpu_attention_backward_flops),
}


class FlopCount(TorchDispatchMode):
    """FLOPs of every op run under it, by torch's own formulas: FlopCounterMode's arithmetic without its
    per-module bookkeeping, which costs several times the ops' own time on a small model."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.by_op[str(func._overloadpacket)] += formula(*args, **kwargs, out_val=out)
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def counted_flops(run: Callable[[], Result]) -> tuple[Result, int]:
    """``run()``'s result and the FLOPs it executed, on any device, the meta device included (gradient
    checkpointing's recomputation counts)."""
    with FlopCount() as counter:
        result = run()
    return result, counter.total


def text_encoder_flops(config) -> int:
    with torch.device("meta"):
        model = (BertModel if isinstance(config, BertConfig) else CLIPTextModel)(config).eval()
        tokens = torch.zeros(1, TOKENS, dtype=torch.long)
    with torch.no_grad():
        return counted_flops(lambda: model(tokens))[1]


def unet_training_flops(unet_config: dict, hidden_size: int) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        size = unet_config["sample_size"]
        latents = torch.zeros(1, 4, size, size)
        text = torch.zeros(1, TOKENS, hidden_size)
        timestep = torch.zeros(1, dtype=torch.long)
    return counted_flops(lambda: unet(latents, timestep, text).sample.float().pow(2).mean().backward())[1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the default model only, no SD 2 base")
    args = parser.parse_args(argv)
    models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
    print(f"{'model':<44}{'text fwd GFLOP':>15}{'UNet train GFLOP':>18}{'text share':>12}")
    sizes = []
    for name, spec in models.items():
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
