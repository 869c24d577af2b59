"""The diffusion LightningModule: what trains, what stays frozen, the objective, CFG dropout, sampling, export."""

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch.utils.data import DataLoader

from configs import load_config
from lightning_modules.latent_diffusion import LatentDiffusionModule, drop_captions
from tests.conftest import TINY_RESOLUTION

CAPTIONS = ["Small left pleural effusion.", "Moderate cardiomegaly.", "Right lower lobe consolidation.", ""]


def tiny_module(tiny_overrides: list[str], *extra: str) -> LatentDiffusionModule:
    cfg = load_config([], [*tiny_overrides, *extra])
    torch.manual_seed(0)
    return LatentDiffusionModule.from_config(cfg)


def tiny_batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pixel_values": torch.rand(4, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=generator) * 2 - 1,
            "caption": CAPTIONS,
            "num_skipped": 0,
        }
        for _ in range(count)
    ]


def fit_steps(
    module: LatentDiffusionModule,
    batches: list[dict],
    tmp_path: Path,
    *callbacks: L.Callback,
    val_batches: list[dict] | None = None,
    **trainer_options,
) -> L.Trainer:
    """One pass of ``trainer.fit`` over ``batches`` (one optimizer step each) without loggers or checkpoints;
    ``trainer_options`` (precision, validation schedule, ...) go to the Trainer."""
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        **trainer_options,
    )
    validation = None if val_batches is None else DataLoader(val_batches, batch_size=None)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), val_dataloaders=validation)
    return trainer


@pytest.mark.parametrize("trainable", [["unet"], ["unet", "text_encoder"], ["unet", "text_encoder", "vae"]])
def test_frozen_parts_stay_bit_identical_and_trainable_parts_change(tiny_overrides, tmp_path, trainable):
    module = tiny_module(tiny_overrides, f"model.trainable=[{','.join(trainable)}]", "train.use_ema=false")
    before = {name: [p.detach().clone() for p in getattr(module, name).parameters()] for name in module.part_names}
    modes_seen: dict[str, bool] = {}

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes_seen.update({name: getattr(pl_module, name).training for name in module.part_names})

    trainer = fit_steps(module, tiny_batches(3), tmp_path, RecordModes())

    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    unused = {id(module.get_parameter(name)) for name in module.unused_parameters}  # e.g. the VAE's decoder
    assert bool(unused) == ("vae" in trainable)  # the tiny CLIP encoder has no unused parameter
    for name in module.part_names:
        params = list(getattr(module, name).parameters())
        changed = [not torch.equal(old, new.detach()) for old, new in zip(before[name], params, strict=True)]
        if name in trainable:
            assert any(changed), f"{name} is trainable but no weight changed"
            trained = [p for p in params if id(p) not in unused]
            assert all(p.requires_grad for p in trained) and not any(p.requires_grad for p in params if id(p) in unused)
            assert {id(p) for p in trained} <= optimizer_params
            assert not any(c for p, c in zip(params, changed, strict=True) if id(p) in unused)
            assert modes_seen[name] is True
        else:
            assert not any(changed), f"{name} is frozen but its weights changed"
            assert not any(p.requires_grad for p in params)
            assert not {id(p) for p in params} & optimizer_params
            assert modes_seen[name] is False, f"frozen {name} must stay in eval mode during training"
    trainable_ids = {id(p) for name in trainable for p in getattr(module, name).parameters()} - unused
    assert optimizer_params == trainable_ids
    learning_rates = {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups}
    cfg = load_config([], tiny_overrides)
    assert learning_rates == {name: cfg.train.learning_rate[name] for name in trainable}


def test_checkpoint_state_holds_only_trainable_parts(tiny_overrides):
    module = tiny_module(tiny_overrides, "model.trainable=[unet,text_encoder]")
    prefixes = {key.split(".")[0] for key in module.state_dict()}
    assert prefixes == {"unet", "text_encoder"}


def test_caption_dropout_rate_matches_probability():
    captions = [f"caption {i}" for i in range(20_000)]
    dropped = drop_captions(captions, 0.3, torch.Generator().manual_seed(1))
    rate = sum(caption == "" for caption in dropped) / len(captions)
    sigma = (0.3 * 0.7 / len(captions)) ** 0.5
    assert abs(rate - 0.3) < 4 * sigma
    assert all(kept in ("", original) for kept, original in zip(dropped, captions, strict=True))


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_training_step_applies_caption_dropout_to_every_caption(tiny_overrides, probability):
    module = tiny_module(tiny_overrides, f"train.ucg_probability={probability}")
    seen: list[str] = []
    encode_text = module.encode_text
    module.encode_text = lambda captions: seen.extend(captions) or encode_text(captions)
    module.train()
    module.training_step(tiny_batches(1)[0], 0)
    expected = CAPTIONS if probability == 0.0 else [""] * len(CAPTIONS)
    assert seen == expected


@pytest.mark.parametrize("extra", [[], ["model.prediction_type=v_prediction", "train.snr_gamma=5.0"]])
def test_loss_on_a_fixed_batch_falls_with_training(tiny_overrides, tmp_path, extra):
    module = tiny_module(tiny_overrides, "train.learning_rate.unet=2e-3", "train.ucg_probability=0", *extra)
    batch = tiny_batches(1)[0]

    def fixed_loss() -> float:
        with torch.no_grad():
            return (
                sum(
                    float(
                        module.diffusion_loss(
                            module.batch_latents(batch, generator := torch.Generator().manual_seed(seed)),
                            batch["caption"],
                            generator,
                        )
                    )
                    for seed in range(8)
                )
                / 8
            )

    initial = fixed_loss()
    fit_steps(module, [batch] * 60, tmp_path)
    module.eval()
    assert fixed_loss() < 0.7 * initial


def test_ema_tracks_training_and_is_used_for_sampling(tiny_overrides, tmp_path):
    module = tiny_module(tiny_overrides, "train.ema_decay=0.5", "train.learning_rate.unet=1e-2")
    trainer = fit_steps(module, tiny_batches(4), tmp_path)
    ema_unet = module.evaluation_parts().denoiser
    assert ema_unet is module.ema.copies["unet"] and not ema_unet.training
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in module.unet.parameters()}  # the training weights
    assert not {id(p) for p in ema_unet.parameters()} & {id(p) for p in optimized}
    assert any(not torch.equal(a, b) for a, b in zip(module.unet.parameters(), ema_unet.parameters(), strict=True))
    assert module.ema.optimization_step == 4
    ran = []
    ema_unet.register_forward_pre_hook(lambda *_: ran.append("ema"))
    module.unet.register_forward_pre_hook(lambda *_: ran.append("training"))
    module.sample(CAPTIONS[:1], num_inference_steps=2)
    assert ran == ["ema", "ema"]


def test_sampling_neither_swaps_nor_copies_weights(tiny_overrides, tmp_path, monkeypatch):
    """The training weights stay where they are during sampling, and nothing but the images goes to the CPU."""
    module = tiny_module(tiny_overrides, "train.ema_decay=0.5", "train.learning_rate.unet=1e-2")
    fit_steps(module, tiny_batches(2), tmp_path)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in module.named_parameters()}
    unchanged_meanwhile = []

    def check(*_):
        unchanged_meanwhile.append(
            all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in module.named_parameters())
        )

    module.evaluation_parts().denoiser.register_forward_pre_hook(check)
    moved_bytes = []
    to_cpu = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda self, *a, **k: moved_bytes.append(self.nbytes) or to_cpu(self, *a, **k)
    )
    images = module.sample(CAPTIONS[:2], num_inference_steps=2)
    assert unchanged_meanwhile == [True, True]
    assert sum(moved_bytes) == images.nbytes  # EMAModel.store moved every trained weight here, each call
    check()
    assert unchanged_meanwhile[-1]


def test_sampling_decodes_one_image_at_a_time_and_runs_under_autocast(tiny_overrides):
    """Decoding per image keeps a 512-px batch in memory; bf16 autocast (the fidelity evaluation's) stays close."""
    module = tiny_module(tiny_overrides)
    vae = module.evaluation_parts().vae
    decoded_batches, dtypes = [], []
    vae.decoder.register_forward_hook(
        lambda _m, args, out: decoded_batches.append(len(out)) or dtypes.append(out.dtype)
    )
    full = module.sample(CAPTIONS[:3], num_inference_steps=2, seed=1)
    assert decoded_batches == [1, 1, 1] and dtypes == [torch.float32] * 3
    half = module.sample(CAPTIONS[:3], num_inference_steps=2, seed=1, autocast_dtype=torch.bfloat16)
    assert dtypes[3:] == [torch.bfloat16] * 3  # the networks ran in bf16
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert 0 < float((half - full).abs().mean()) < 0.05


class SaveCheckpointMidway(L.Callback):
    """Write a checkpoint in the middle of an evaluation (what SIGTERM or SLURM's SIGUSR1 may do)."""

    def __init__(self, path: Path, moment: str) -> None:
        self.path, self.moment, self.training_weights = path, moment, None

    def save(self, trainer, module) -> None:
        if self.training_weights is None:
            self.training_weights = {k: v.detach().clone() for k, v in module.unet.state_dict().items()}
            trainer.save_checkpoint(self.path)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.moment == "validation" and not trainer.sanity_checking:
            self.save(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.moment == "sampling" and trainer.global_step == 2:
            hook = pl_module.evaluation_parts().denoiser.register_forward_pre_hook(
                lambda *_: self.save(trainer, pl_module)
            )
            pl_module.sample(CAPTIONS[:1], num_inference_steps=2)
            hook.remove()


@pytest.mark.parametrize("moment", ["validation", "sampling"])
def test_a_checkpoint_written_while_evaluating_holds_the_training_weights(tiny_overrides, tmp_path, moment):
    module = tiny_module(tiny_overrides, "train.ema_decay=0.5", "train.learning_rate.unet=1e-2")
    midway = SaveCheckpointMidway(tmp_path / "midway.ckpt", moment)
    calls = []  # which UNet ran, and with autograd (training steps) or without (validation, sampling)
    module.unet.register_forward_pre_hook(lambda *_: calls.append(("training", torch.is_grad_enabled())))
    module.ema.copies["unet"].register_forward_pre_hook(lambda *_: calls.append(("ema", torch.is_grad_enabled())))
    fit_steps(
        module,
        tiny_batches(3),
        tmp_path,
        midway,
        val_batches=tiny_batches(1),
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    saved = torch.load(midway.path, map_location="cpu", weights_only=True)
    unet_weights = {k.removeprefix("unet."): v for k, v in saved["state_dict"].items() if k.startswith("unet.")}
    assert unet_weights.keys() == midway.training_weights.keys()
    assert all(torch.equal(unet_weights[k], v) for k, v in midway.training_weights.items())
    ema = saved["ema"]["weights"]
    assert any(not torch.equal(ema[f"unet.{k}"], v) for k, v in unet_weights.items())  # the EMA is elsewhere
    assert set(calls) == {("training", True), ("ema", False)}  # evaluations ran on the EMA copy only


def test_pretrained_folder_loads_the_saved_weights(tiny_overrides, tiny_model_dir):
    module = tiny_module(tiny_overrides)
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    for name in module.part_names:
        ours, theirs = getattr(module, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_text_encoder_hidden_size_sets_cross_attention_width(tiny_overrides):
    """The embedded default's real pretrained encoder (MiniLM BERT, hidden 384) drives the UNet's width."""
    overrides = [o for o in tiny_overrides if not o.startswith("model.")]
    module = tiny_module(overrides, "model.vae.pretrained=null")
    assert module.text_encoder.config.hidden_size == 384
    assert module.unet.config.cross_attention_dim == 384
    assert module.tokenizer.model_max_length == 77
    assert module.encode_text(["Small left pleural effusion."]).shape == (1, 77, 384)


def test_exported_pipeline_loads_in_diffusers_and_reproduces_our_samples(tiny_overrides, tmp_path):
    module = tiny_module(tiny_overrides, "train.use_ema=false")
    folder = module.export_pipeline(tmp_path / "pipeline")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        ["Moderate cardiomegaly."],
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    ours = module.sample(["Moderate cardiomegaly."], num_inference_steps=3, guidance_scale=4.0, seed=5)
    assert theirs.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    torch.testing.assert_close(theirs.float(), ours, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_prompt_dependent(tiny_overrides):
    module = tiny_module(tiny_overrides)
    first = module.sample(CAPTIONS[:2], num_inference_steps=2, seed=3)
    again = module.sample(CAPTIONS[:2], num_inference_steps=2, seed=3)
    other_seed = module.sample(CAPTIONS[:2], num_inference_steps=2, seed=4)
    assert first.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_frozen_text_features_are_cached_bounded_and_equal_to_fresh_ones(tiny_overrides):
    module = tiny_module(tiny_overrides, "train.text_feature_cache_size=2")
    module.eval()
    fresh = module._run_text_encoder(CAPTIONS)
    cached = module.encode_text(CAPTIONS)
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=0)
    assert list(module.text_feature_cache) == CAPTIONS[-2:]  # least recently used captions evicted
    calls = []
    run = module._run_text_encoder
    module._run_text_encoder = lambda captions: calls.append(list(captions)) or run(captions)
    again = module.encode_text(CAPTIONS[-2:])
    assert calls == [] and torch.equal(again, cached[-2:])


def test_text_features_are_never_cached_for_a_trainable_encoder(tiny_overrides):
    module = tiny_module(tiny_overrides, "train.text_feature_cache_size=8", "model.trainable=[unet,text_encoder]")
    module.train()
    features = module.encode_text(CAPTIONS)
    assert features.requires_grad and not module.text_feature_cache


def test_uncounted_repeats_carry_no_loss_weight(tiny_overrides):
    """The evening-out repeats of an epoch's last batches (loss_weight 0) leave the loss unchanged."""
    module = tiny_module(tiny_overrides)
    latents = module.encode_images(tiny_batches(1)[0]["pixel_values"], torch.Generator().manual_seed(0))
    other = latents.clone()
    other[2:] += 3  # far off: a random draw moved the unweighted loss by only 0.07% at the dependency floors

    def loss(values: torch.Tensor, weights: torch.Tensor | None) -> float:
        with torch.no_grad():
            return float(module.diffusion_loss(values, CAPTIONS, torch.Generator().manual_seed(1), weights))

    counted_first_two = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert loss(latents, counted_first_two) == pytest.approx(loss(other, counted_first_two), rel=1e-6)
    assert loss(latents, None) != pytest.approx(loss(other, None), rel=1e-3)
    assert loss(latents, torch.ones(4)) == pytest.approx(loss(latents, None), rel=1e-6)
