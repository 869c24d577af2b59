import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from grounding.attention_capture import capture_cross_attention

TOKENS = 7
TEXT_DIM = 32


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
    ).eval()


def cross_attention_layers(unet: UNet2DConditionModel) -> set[str]:
    return {key.removesuffix(".processor") for key in unet.attn_processors if key.endswith("attn2.processor")}


def inputs(batch: int, seed: int, size: tuple[int, int] = (16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *size, generator=generator)
    text = torch.randn(batch, TOKENS, TEXT_DIM, generator=generator)
    return latents, text


@torch.no_grad()
def test_every_cross_attention_layer_records_maps_at_the_common_resolution(unet):
    latents, text = inputs(batch=3, seed=1)
    with capture_cross_attention(unet) as attention:
        unet(latents, 10, encoder_hidden_states=text)
        unet(latents, 20, encoder_hidden_states=text)

    layers = cross_attention_layers(unet)
    assert len(layers) == 4
    assert set(attention.recorded_layers) == layers
    assert attention.num_recorded == 2 * len(layers)
    assert attention.recorded_layers["mid_block.attentions.0.transformer_blocks.0.attn2"] == (8, 8)
    assert attention.recorded_layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == (16, 16)
    maps = attention.mean_maps()
    assert maps.shape == (3, TOKENS, 16, 16)
    # Softmax over text tokens: every query's probabilities sum to one, and bilinear resizing keeps that.
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(3, 16, 16))


@torch.no_grad()
def test_recorded_map_is_head_averaged_softmax_over_tokens(unet):
    """Independent recomputation for the 8×8 mid-block layer, read at its native resolution."""
    mid_attention = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    layer_inputs = {}

    def keep_inputs(_module, args, kwargs):
        layer_inputs["hidden"] = args[0]
        layer_inputs["text"] = kwargs["encoder_hidden_states"]

    latents, text = inputs(batch=2, seed=2)
    hook = mid_attention.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        with capture_cross_attention(unet, resolution=8, layer_resolutions={8}) as attention:
            unet(latents, 10, encoder_hidden_states=text)
    finally:
        hook.remove()

    heads = mid_attention.heads
    query = mid_attention.to_q(layer_inputs["hidden"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    key = mid_attention.to_k(layer_inputs["text"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    probabilities = (query @ key.transpose(-1, -2) * mid_attention.scale).softmax(dim=-1).mean(dim=1)
    expected = probabilities.transpose(1, 2).reshape(2, TOKENS, 8, 8)
    torch.testing.assert_close(attention.mean_maps(), expected)


@torch.no_grad()
def test_capture_leaves_the_unet_output_unchanged(unet):
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    latents, text = inputs(batch=2, seed=3)
    expected = unet(latents, 10, encoder_hidden_states=text).sample
    with capture_cross_attention(unet) as attention:
        captured = unet(latents, 10, encoder_hidden_states=text).sample
    assert attention.num_recorded == 4
    torch.testing.assert_close(captured, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_processors_and_latent_size_hook_are_restored_also_after_an_exception(unet):
    original = unet.attn_processors
    latents, text = inputs(batch=1, seed=4)
    with capture_cross_attention(unet) as attention:
        unet(latents, 10, encoder_hidden_states=text)
    assert all(unet.attn_processors[key] is processor for key, processor in original.items())

    with pytest.raises(KeyError), capture_cross_attention(unet):
        raise KeyError("inside the capture")
    assert all(unet.attn_processors[key] is processor for key, processor in original.items())

    small_latents, _ = inputs(batch=1, seed=4, size=(8, 8))
    unet(small_latents, 10, encoder_hidden_states=text)
    assert attention.latent_size == (16, 16)
    assert attention.num_recorded == 4


@torch.no_grad()
def test_drop_unconditional_keeps_the_conditional_half_of_a_guided_batch(unet):
    latents, conditional_text = inputs(batch=2, seed=5)
    unconditional_text = torch.zeros_like(conditional_text)
    with capture_cross_attention(unet, drop_unconditional=True) as guided:
        unet(
            torch.cat([latents, latents]),
            10,
            encoder_hidden_states=torch.cat([unconditional_text, conditional_text]),
        )
    with capture_cross_attention(unet) as conditional_only:
        unet(latents, 10, encoder_hidden_states=conditional_text)
    with capture_cross_attention(unet) as unconditional_only:
        unet(latents, 10, encoder_hidden_states=unconditional_text)

    assert guided.mean_maps().shape == (2, TOKENS, 16, 16)
    torch.testing.assert_close(guided.mean_maps(), conditional_only.mean_maps(), atol=1e-5, rtol=0)
    assert not torch.allclose(guided.mean_maps(), unconditional_only.mean_maps(), atol=1e-3)

    odd_latents, odd_text = inputs(batch=3, seed=5)
    with pytest.raises(ValueError, match="even"), capture_cross_attention(unet, drop_unconditional=True):
        unet(odd_latents, 10, encoder_hidden_states=odd_text)


@torch.no_grad()
def test_step_filter_records_only_selected_steps(unet):
    per_step_inputs = [inputs(batch=2, seed=10 + step) for step in range(4)]
    with capture_cross_attention(unet, steps={1, 3}) as filtered:
        for step, (latents, text) in enumerate(per_step_inputs):
            filtered.set_step(step)
            unet(latents, 100 - step, encoder_hidden_states=text)
    with capture_cross_attention(unet) as selected_only:
        for step in (1, 3):
            latents, text = per_step_inputs[step]
            unet(latents, 100 - step, encoder_hidden_states=text)

    assert filtered.num_recorded == 2 * 4
    torch.testing.assert_close(filtered.mean_maps(), selected_only.mean_maps())

    latents, text = per_step_inputs[0]
    with pytest.raises(RuntimeError, match="set_step"), capture_cross_attention(unet, steps={0}):
        unet(latents, 10, encoder_hidden_states=text)


@torch.no_grad()
def test_layer_resolution_filter_records_only_matching_layers(unet):
    latents, text = inputs(batch=2, seed=6)
    expected = unet(latents, 10, encoder_hidden_states=text).sample
    with capture_cross_attention(unet, layer_resolutions={8}) as low_resolution:
        captured = unet(latents, 10, encoder_hidden_states=text).sample
    with capture_cross_attention(unet, layer_resolutions={16}) as high_resolution:
        unet(latents, 10, encoder_hidden_states=text)

    assert set(low_resolution.recorded_layers) == {"mid_block.attentions.0.transformer_blocks.0.attn2"}
    assert low_resolution.num_recorded == 1
    assert set(high_resolution.recorded_layers.values()) == {(16, 16)}
    assert high_resolution.num_recorded == 3
    torch.testing.assert_close(captured, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_non_square_latents_keep_their_aspect(unet):
    latents, text = inputs(batch=2, seed=7, size=(16, 24))
    with capture_cross_attention(unet) as native:
        unet(latents, 10, encoder_hidden_states=text)
    with capture_cross_attention(unet, resolution=8) as square:
        unet(latents, 10, encoder_hidden_states=text)

    assert native.recorded_layers["mid_block.attentions.0.transformer_blocks.0.attn2"] == (8, 12)
    assert native.mean_maps().shape == (2, TOKENS, 16, 24)
    assert square.mean_maps().shape == (2, TOKENS, 8, 8)
    torch.testing.assert_close(square.mean_maps().sum(dim=1), torch.ones(2, 8, 8))


@torch.no_grad()
def test_heatmap_averages_each_samples_selected_tokens(unet):
    latents, text = inputs(batch=2, seed=8)
    with capture_cross_attention(unet) as attention:
        unet(latents, 10, encoder_hidden_states=text)

    heatmaps = attention.heatmap([[1, 2], [4]])
    maps = attention.mean_maps()
    assert heatmaps.shape == (2, 16, 16)
    torch.testing.assert_close(heatmaps[0], (maps[0, 1] + maps[0, 2]) / 2)
    torch.testing.assert_close(heatmaps[1], maps[1, 4])
    with pytest.raises(ValueError, match="recorded 2"):
        attention.heatmap([[1]])
    with pytest.raises(ValueError, match="at least one token"):
        attention.heatmap([[1], []])
