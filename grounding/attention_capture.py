"""Cross-attention capture for phrase grounding.

The denoiser's default processor (``AttnProcessor2_0``, SDPA) never materialises attention probabilities, so
:class:`CrossAttentionRecorder` recomputes cross-attention with the plain softmax math and hands the
probabilities to an :class:`AttentionAccumulator`. The accumulator averages heads, optionally drops the
unconditional half of a guided batch, brings each layer's map to the latent grid and then to one common resolution
and keeps a running sum, so memory does not grow with steps × layers.

Both backbones' ``attn2`` layers are recorded: a UNet's (queries: one feature-map level, the latent grid downsampled
by 2^k) and a diffusion transformer's such as PixArt-Σ (queries: the patch tokens, the latent grid downsampled by
its ``config.patch_size``); see :meth:`AttentionAccumulator.to_latent_grid` for how each reaches the latent grid.

Usage (one DDIM loop; the caller names the step so the step filter can act)::

    with capture_cross_attention(unet, steps=range(10, 50)) as attention:
        for i, t in enumerate(scheduler.timesteps):
            attention.set_step(i)
            unet(latents_at(t), t, encoder_hidden_states=text).sample
    heatmaps = attention.heatmap(token_indices_per_sample)  # (batch, R_h, R_w)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

CROSS_ATTENTION_SUFFIX = "attn2.processor"


class AttentionAccumulator:
    """Running mean of head-averaged cross-attention maps, resized to one common resolution.

    Args:
        resolution: common map size, ``R`` or ``(R_h, R_w)``; ``None`` → the latent size of the first call.
        layer_resolutions: record only layers whose native map height is in this set (for square latents the
            side length, e.g. ``{64, 32, 16, 8}`` for SD v2 at 512²; a transformer's one patch-grid side, e.g. 32
            for PixArt-Σ at 512²); ``None`` → every layer.
        steps: record only while the step given to :meth:`set_step` is in this set; ``None`` → every call.
        drop_unconditional: the batch is a guided ``[unconditional; conditional]`` pair; keep the second half.
        patch_size: the queries are a transformer's patch tokens, each embedding ``patch_size`` × ``patch_size``
            latent cells (``PixArtTransformer2DModel.config.patch_size``); ``None`` → a UNet's feature maps.
    """

    def __init__(
        self,
        resolution: int | tuple[int, int] | None = None,
        layer_resolutions: Collection[int] | None = None,
        steps: Collection[int] | None = None,
        drop_unconditional: bool = False,
        patch_size: int | None = None,
    ) -> None:
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.layer_resolutions = None if layer_resolutions is None else frozenset(layer_resolutions)
        self.steps = None if steps is None else frozenset(steps)
        self.drop_unconditional = drop_unconditional
        self.patch_size = patch_size
        self.latent_size: tuple[int, int] | None = None
        self.current_step: int | None = None
        self.recorded_layers: dict[str, tuple[int, int]] = {}
        self.num_recorded = 0
        self._sum: torch.Tensor | None = None

    def set_step(self, step: int) -> None:
        """Tell the accumulator which denoising step the next denoiser call belongs to."""
        self.current_step = step

    def set_latent_size(self, height: int, width: int) -> None:
        """Latent size of the denoiser's input; needed to unflatten each layer's query axis."""
        self.latent_size = (height, width)

    def layer_map_size(self, num_queries: int) -> tuple[int, int]:
        """Native (h, w) of a layer with ``num_queries`` positions: the latent size after k stride-2 convs (UNet),
        or the patch grid, the latent size divided by the patch size (transformer)."""
        if self.latent_size is None:
            raise RuntimeError("AttentionAccumulator: latent size unknown; call set_latent_size(h, w) first")
        height, width = self.latent_size
        if self.patch_size is not None:
            patch_grid = (height // self.patch_size, width // self.patch_size)
            if patch_grid[0] * patch_grid[1] != num_queries:
                raise ValueError(
                    f"AttentionAccumulator: {num_queries} query positions are not the {patch_grid} patch grid of "
                    f"the latent size {self.latent_size} at patch size {self.patch_size}"
                )
            return patch_grid
        for level in range(max(height, width).bit_length() + 1):
            map_size = (math.ceil(height / 2**level), math.ceil(width / 2**level))
            if map_size[0] * map_size[1] == num_queries:
                return map_size
        raise ValueError(
            f"AttentionAccumulator: {num_queries} query positions match no downsampling of the latent size "
            f"{self.latent_size}"
        )

    def should_record(self, map_size: tuple[int, int]) -> bool:
        """Whether a layer with this native map size is recorded at the current step."""
        if self.steps is not None:
            if self.current_step is None:
                raise RuntimeError("AttentionAccumulator: steps filter set; call set_step(i) before the denoiser")
            if self.current_step not in self.steps:
                return False
        return self.layer_resolutions is None or map_size[0] in self.layer_resolutions

    def add(self, layer_name: str, probabilities: torch.Tensor, map_size: tuple[int, int]) -> None:
        """Add one layer call's probabilities, shape (batch, heads, queries, tokens), to the running sum."""
        maps = probabilities.float().mean(dim=1)
        if self.drop_unconditional:
            if maps.shape[0] % 2:
                raise ValueError(
                    f"AttentionAccumulator: drop_unconditional needs an even [uncond; cond] batch, got {maps.shape[0]}"
                )
            maps = maps[maps.shape[0] // 2 :]
        batch, _, tokens = maps.shape
        maps = self.to_latent_grid(maps.transpose(1, 2).reshape(batch, tokens, *map_size))
        target = self.resolution or self.latent_size
        if maps.shape[-2:] != target:
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        if self._sum is None:
            self._sum = torch.zeros_like(maps)
        elif self._sum.shape != maps.shape:
            raise ValueError(
                f"AttentionAccumulator: layer {layer_name} gave maps of shape {tuple(maps.shape)}, "
                f"earlier calls {tuple(self._sum.shape)}; use one accumulator per batch"
            )
        self._sum += maps
        self.num_recorded += 1
        self.recorded_layers[layer_name] = map_size

    def to_latent_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """A transformer layer's (batch, tokens, h, w) patch-grid maps on the latent grid: each patch token's
        probability on every one of the p × p latent cells it covers (nearest, exact), because the patch embedding
        (a stride-p convolution) reads exactly those cells and unpatchify writes the token's output back to them.
        Bilinear upsampling, which a UNet level's maps get (their cells' receptive fields overlap), would spread a
        patch's attention onto its neighbours' cells. A UNet level's maps are returned unchanged (they go straight
        to the common resolution, bilinear); a transformer's latent-grid maps go on to it the same way."""
        if self.patch_size is None:
            return maps
        return maps.repeat_interleave(self.patch_size, dim=-2).repeat_interleave(self.patch_size, dim=-1)

    def mean_maps(self) -> torch.Tensor:
        """Mean attention map per token over all recorded calls: (batch, tokens, R_h, R_w)."""
        if self._sum is None:
            raise RuntimeError("AttentionAccumulator: nothing recorded (check the step and layer filters)")
        return self._sum / self.num_recorded

    def heatmap(self, token_indices_per_sample: Sequence[Sequence[int]]) -> torch.Tensor:
        """Per-sample mean over the selected tokens of :meth:`mean_maps`: (batch, R_h, R_w)."""
        maps = self.mean_maps()
        if len(token_indices_per_sample) != maps.shape[0]:
            raise ValueError(
                f"AttentionAccumulator.heatmap: got token indices for {len(token_indices_per_sample)} "
                f"samples, recorded {maps.shape[0]}"
            )
        heatmaps = []
        for sample_maps, token_indices in zip(maps, token_indices_per_sample, strict=True):
            if not token_indices:
                raise ValueError("AttentionAccumulator.heatmap: every sample needs at least one token index")
            heatmaps.append(sample_maps[list(token_indices)].mean(dim=0))
        return torch.stack(heatmaps)


class CrossAttentionRecorder:
    """Attention processor that computes cross-attention with explicit probabilities and records them.

    The output is the plain attention of diffusers' ``AttnProcessor`` (equal, to float tolerance, to any
    processor implementing standard attention, SDPA included). Calls the accumulator does not want, and
    self-attention calls, go to the layer's previous processor unchanged.
    """

    def __init__(self, layer_name: str, accumulator: AttentionAccumulator, previous_processor: Any) -> None:
        self.layer_name = layer_name
        self.accumulator = accumulator
        self.previous_processor = previous_processor

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()  # (b, c, h, w)
        is_cross_attention = encoder_hidden_states is not None
        map_size = self.accumulator.layer_map_size(num_queries) if is_cross_attention else None
        if map_size is None or not self.accumulator.should_record(map_size):
            return self.previous_processor(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                temb=temb,
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch_size, num_tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, num_tokens, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states), out_dim=4)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probabilities = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1), attention_mask)
        self.accumulator.add(self.layer_name, probabilities.unflatten(0, (batch_size, attn.heads)).detach(), map_size)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(image_shape) == 4:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(
    denoiser: torch.nn.Module,
    resolution: int | tuple[int, int] | None = None,
    layer_resolutions: Collection[int] | None = None,
    steps: Collection[int] | None = None,
    drop_unconditional: bool = False,
) -> Iterator[AttentionAccumulator]:
    """Record every cross-attention layer of a diffusers denoiser (keys ending in ``attn2.processor``): a
    ``UNet2DConditionModel``, or a patch transformer such as ``PixArtTransformer2DModel``, recognised by the
    ``patch_size`` in its config (its queries are patch tokens, see :meth:`AttentionAccumulator.to_latent_grid`).

    Other layers keep their processor; all processors are restored on exit, also after an exception.
    The latent size is read from the denoiser's input by a forward pre-hook, removed on exit.
    See :class:`AttentionAccumulator` for the arguments.
    """
    config = getattr(denoiser, "config", None)
    patch_size = getattr(config, "patch_size", None)
    accumulator = AttentionAccumulator(resolution, layer_resolutions, steps, drop_unconditional, patch_size)
    original_processors = denoiser.attn_processors
    cross_attention_keys = [key for key in original_processors if key.endswith(CROSS_ATTENTION_SUFFIX)]
    if not cross_attention_keys:
        raise ValueError(
            f"capture_cross_attention: {type(denoiser).__name__} has no attention processor key ending in "
            f"'{CROSS_ATTENTION_SUFFIX}'"
        )
    recording_processors = dict(original_processors)
    for key in cross_attention_keys:
        layer_name = key.removesuffix(".processor")
        recording_processors[key] = CrossAttentionRecorder(layer_name, accumulator, original_processors[key])

    def read_latent_size(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet's / transformer's
        accumulator.set_latent_size(*sample.shape[-2:])

    hook = denoiser.register_forward_pre_hook(read_latent_size, with_kwargs=True)
    denoiser.set_attn_processor(recording_processors)
    try:
        yield accumulator
    finally:
        hook.remove()
        denoiser.set_attn_processor(dict(original_processors))
