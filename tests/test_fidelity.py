"""FID, classifier agreement, diversity, the reference-statistics cache, the offline extractors' errors, the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate
import metrics.fidelity_evaluation
from configs import load_config
from datamodules.synthetic import ensure_synthetic_dataset
from lightning_modules.loading import load_diffusion_module
from metrics.domain_classifier import FINDINGS
from metrics.feature_extractors import (
    EXTRACTORS,
    FeatureExtractor,
    MissingFeatureExtractorError,
    build_feature_extractor,
)
from metrics.fidelity import (
    FeatureStatistics,
    FidelityMetrics,
    FrechetDistance,
    frechet_distance,
    mean_pairwise_ms_ssim,
    ms_ssim_scales,
)
from metrics.fidelity_evaluation import FidelityEvaluation


def scipy_frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """The textbook formula, independently: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = real.mean(axis=0), generated.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def correlated_features(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + shift


def test_fid_of_a_set_against_itself_is_zero():
    features = correlated_features(300, 16, seed=0)
    assert abs(frechet_distance(features, features)) < 1e-8


def test_fid_grows_with_the_distance_between_distributions():
    real = correlated_features(300, 16, seed=0)
    same_distribution = frechet_distance(real, correlated_features(300, 16, seed=1))
    shifted = frechet_distance(real, correlated_features(300, 16, seed=1, shift=2.0))
    further = frechet_distance(real, correlated_features(300, 16, seed=1, shift=4.0))
    assert same_distribution < 0.1 * shifted
    assert shifted > 16 * 2.0**2 * 0.9  # the mean term alone is |shift|^2 per dimension
    assert further > shifted


def test_fid_matches_an_independent_scipy_computation():
    real, generated = correlated_features(400, 12, seed=0), correlated_features(300, 12, seed=1, shift=0.5)
    expected = scipy_frechet_distance(real.numpy(), generated.numpy())
    assert frechet_distance(real, generated) == pytest.approx(expected, rel=1e-6)
    # The evaluation's path: cached reference statistics loaded, generated features in several batches.
    metric = FrechetDistance(12)
    metric.load_reference(FeatureStatistics.of(real))
    for chunk in generated.split(64):
        metric.update(chunk, real=False)
    value = metric.compute()
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_fid_statistics_do_not_depend_on_how_images_were_split():
    """What makes the multi-process value equal the single-process one: states are sums."""
    features = correlated_features(100, 8, seed=3)
    whole, parts = FrechetDistance(8), [FrechetDistance(8), FrechetDistance(8)]
    whole.update(features, real=False)
    parts[0].update(features[:37], real=False)
    parts[1].update(features[37:], real=False)
    assert torch.allclose(whole.fake_features_cov_sum, parts[0].fake_features_cov_sum + parts[1].fake_features_cov_sum)
    assert int(whole.fake_features_num_samples) == sum(int(p.fake_features_num_samples) for p in parts)


class QuadrantFeatures(FeatureExtractor):
    """A stand-in extractor: mean brightness of the four quadrants; scores are the first row's first 8 pixels."""

    name = "quadrants"
    num_features = 4
    findings = FINDINGS

    def __init__(self) -> None:
        super().__init__("quadrants-v1")
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(dim=1)
        h, w = gray.shape[-2] // 2, gray.shape[-1] // 2
        quadrants = [gray[:, :h, :w], gray[:, :h, w:], gray[:, h:, :w], gray[:, h:, w:]]
        return torch.stack([q.mean(dim=(1, 2)) for q in quadrants], dim=1)

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :8]


def images_carrying_scores(scores: torch.Tensor, size: int = 16) -> torch.Tensor:
    images = torch.rand(len(scores), 3, size, size, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, :8] = scores
    return images


def test_classifier_agreement_is_per_finding_auroc_of_scores_against_prompt_findings():
    targets = torch.zeros(12, 8)
    targets[:6, 0] = 1  # Atelectasis in half of the prompts
    targets[::2, 1] = 1  # Cardiomegaly in the other pattern
    targets[0, 2] = -1  # an uncertain label is left out
    scores = torch.rand(12, 8, generator=torch.Generator().manual_seed(1))
    scores[:, 0] = targets[:, 0] * 0.5 + 0.25  # agrees perfectly
    scores[:, 1] = 1 - targets[:, 1]  # disagrees perfectly
    extractor = QuadrantFeatures()
    metrics = FidelityMetrics([extractor], scorer=extractor, num_images=12, measure_diversity=False)
    metrics.load_reference({"quadrants": FeatureStatistics.of(extractor(torch.rand(20, 3, 16, 16)))})
    metrics.update(images_carrying_scores(scores[:5]), targets[:5], torch.arange(5))
    metrics.update(images_carrying_scores(scores[5:]), targets[5:], torch.arange(5, 12))
    results = metrics.compute()
    assert results["agreement/quadrants/auroc_atelectasis"] == pytest.approx(1.0)
    assert results["agreement/quadrants/auroc_cardiomegaly"] == pytest.approx(0.0)
    assert "agreement/quadrants/auroc_consolidation" not in results  # no positive prompt: no AUROC, not logged
    assert results["agreement/quadrants/auroc_mean"] == pytest.approx(0.5)
    assert results["fid/quadrants@12"] > 0


def test_ms_ssim_diversity_is_one_for_copies_and_low_for_unrelated_images():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 72, 72, generator=generator), 9, stride=1)
    copies = smooth.expand(4, 3, 64, 64)
    unrelated = torch.rand(4, 3, 64, 64, generator=generator)
    assert mean_pairwise_ms_ssim(copies) == pytest.approx(1.0, abs=1e-5)
    assert mean_pairwise_ms_ssim(unrelated) < 0.2
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_ms_ssim(copies[:1])


@pytest.mark.parametrize(("size", "scales"), [(32, 2), (64, 3), (128, 4), (512, 5)])
def test_ms_ssim_uses_the_scales_the_image_size_allows(size, scales):
    betas = ms_ssim_scales(size)
    assert len(betas) == scales
    assert sum(betas) == pytest.approx(1.0)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(("name", "package"), [("inception", "torch_fidelity"), ("xrv", "torchxrayvision")])
def test_missing_optional_extractor_fails_fast_naming_what_to_install_and_place(name, package, no_network, tmp_path):
    for weights in (None, tmp_path / "absent.pt"):
        started = time.perf_counter()
        with pytest.raises(MissingFeatureExtractorError) as error:
            build_feature_extractor(name, **{f"{name}_weights": weights})
        assert time.perf_counter() - started < 2.0
        message = str(error.value)
        assert f"fidelity.{name}_weights" in message
        assert "nothing is downloaded" in message
        if weights is not None:
            assert str(weights) in message
        if importlib.util.find_spec(package) is None:
            assert "pip install 'cxr-diffusion[gpu-metrics]'" in message


# ------------------------------------------------------------------------------ on the synthetic held-out split
@pytest.fixture(scope="module")
def held_out_root(tmp_path_factory) -> Path:
    """Large enough for a held-out split of a dozen images (the shared 40-study set has 3)."""
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("fidelity-data"), n=120, resolution=48, seed=0)


def fidelity_overrides(root: Path, cache_dir: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"data.cache_dir={cache_dir}",
        "data.resolution=32",
        "fidelity.batch_size=4",
        "fidelity.domain_classifier.resolution=32",
        "fidelity.domain_classifier.steps=10",
        "fidelity.domain_classifier.batch_size=16",
        "fidelity.diversity.num_prompts=1",
        "fidelity.diversity.images_per_prompt=2",
    ]


def test_reference_statistics_are_cached_and_invalidated_by_m_and_extractor(held_out_root, tmp_path, monkeypatch):
    extractions = []
    original = FidelityEvaluation.real_image_batches

    def counting(self):
        extractions.append(self.num_images)
        return original(self)

    monkeypatch.setattr(FidelityEvaluation, "real_image_batches", counting)
    base = fidelity_overrides(held_out_root, tmp_path / "cache")
    first = FidelityEvaluation(load_config([], base), held_out_root, 8).reference()["domain"]
    again = FidelityEvaluation(load_config([], base), held_out_root, 8).reference()["domain"]
    assert extractions == [8]  # the second call read the cache: no feature extraction of the real set
    assert torch.equal(again.statistics.outer_sum, first.statistics.outer_sum)
    assert again.real_halves_fid == first.real_halves_fid
    FidelityEvaluation(load_config([], base), held_out_root, 10).reference()
    assert extractions == [8, 10]  # M changed
    other_extractor = load_config([], [*base, "fidelity.domain_classifier.width=8"])
    FidelityEvaluation(other_extractor, held_out_root, 8).reference()
    assert extractions == [8, 10, 8]  # the extractor (another classifier's weights) changed


def test_m_larger_than_the_held_out_split_is_capped_with_a_warning(held_out_root, tmp_path, caplog):
    cfg = load_config([], fidelity_overrides(held_out_root, tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        evaluation = FidelityEvaluation(cfg, held_out_root, 500)
    assert evaluation.num_images == 12  # the synthetic set's usable validate samples
    assert "M=500 requested" in caplog.text and "using M=12" in caplog.text
    with pytest.raises(ValueError, match="at least 2 images"):
        FidelityEvaluation(cfg, held_out_root, 1)


def test_evaluate_fidelity_writes_json_markdown_and_grid(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor
):
    out = tmp_path / "eval"
    evaluate.main(
        [
            "fidelity",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--num-images",
            "6",
            "--extractors",
            "domain,linear",
            "--device",
            "cpu",
            *fidelity_overrides(held_out_root, tmp_path / "cache"),
            "fidelity.num_inference_steps=2",
            "model.text_encoder.max_length=16",
            "model.text_encoder.use_attention_mask=false",
        ]
    )
    summary = json.loads((out / "fidelity.json").read_text())
    metrics = summary["metrics"]
    assert summary["num_images"] == 6 and summary["extractors"] == ["domain", "linear"] and summary["device"] == "cpu"
    assert metrics["fid/domain@6"] > 0 and metrics["fid/linear@6"] > 0
    assert 0 <= metrics["agreement/domain/auroc_mean"] <= 1
    assert 0 <= metrics["diversity/ms_ssim"] <= 1
    assert set(summary["real_halves_fid"]) == {"domain", "linear"}
    assert all(value >= 0 for value in summary["real_halves_fid"].values())
    assert set(summary["autoencoder_floor_fid"]) == {"domain", "linear"}
    assert all(value > 0 for value in summary["autoencoder_floor_fid"].values())  # an untrained VAE is no identity
    markdown = (out / "fidelity.md").read_text()
    for name in ("domain", "linear"):
        assert f"| fid/{name}@6 |" in markdown and f"| fid/{name}, real held-out set half vs half" in markdown
        assert f"| fid/{name}, real held-out set vs its own VAE reconstructions" in markdown
    assert (out / "samples.png").stat().st_size > 0


# ------------------------------------------------------------------------------ several extractors, precision
class LinearFeatures(FeatureExtractor):
    """A second stand-in: a fixed random linear map of 4x4-pooled grayscale images (autocast changes a matmul)."""

    name = "linear"
    num_features = 6
    findings = FINDINGS

    def __init__(self) -> None:
        super().__init__("linear-v1")
        self.projection = torch.nn.Linear(16, self.num_features)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.projection.bias)  # identity "linear-v1" names these very weights (cache key)
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), 4).flatten(1)
        return self.projection(pooled)

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(images)[:, :1].expand(-1, len(FINDINGS)))


TINY_MODEL = ["model.text_encoder.max_length=16", "model.text_encoder.use_attention_mask=false"]


@pytest.fixture
def with_linear_extractor(monkeypatch):
    """``linear`` selectable by name in fidelity.extractors, beside the real ones."""
    real = metrics.fidelity_evaluation.build_feature_extractor

    def build(name, *args):
        return LinearFeatures() if name == "linear" else real(name, *args)

    monkeypatch.setattr(metrics.fidelity_evaluation, "EXTRACTORS", (*EXTRACTORS, "linear"))
    monkeypatch.setattr(metrics.fidelity_evaluation, "build_feature_extractor", build)


def tiny_evaluation(model_dir: Path, root: Path, cache_dir: Path, *overrides: str):
    module, cfg = load_diffusion_module(
        model_dir,
        [*fidelity_overrides(root, cache_dir), "fidelity.num_inference_steps=2", *TINY_MODEL, *overrides],
    )
    return module, FidelityEvaluation(cfg, root, 6)


class StandInVae(torch.nn.Module):
    """``encode(x).latent_dist.mode()`` is x; ``decode(z).sample`` is ``reconstruct(z)``: a VAE of known output."""

    dtype = torch.float32

    def __init__(self, reconstruct) -> None:
        super().__init__()
        self.reconstruct = reconstruct

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.reconstruct(latents))


@pytest.mark.parametrize("reconstruct", ["perfect", "grey"])
def test_autoencoder_floor_is_the_fid_of_the_real_images_against_their_reconstructions(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor, monkeypatch, reconstruct
):
    module, evaluation = tiny_evaluation(
        tiny_model_dir, held_out_root, tmp_path / "cache", "fidelity.extractors=[domain,linear]"
    )
    vae = StandInVae((lambda z: z) if reconstruct == "perfect" else torch.zeros_like)  # 0 in [-1, 1]: grey 0.5
    parts = module.evaluation_parts()
    monkeypatch.setattr(module, "evaluation_parts", lambda: replace(parts, vae=vae))
    floor = evaluation.autoencoder_floor(module, evaluation.reference())
    real = torch.cat(list(evaluation.real_image_batches()))
    for name in ("domain", "linear"):
        features = evaluation.extractor(name)
        if reconstruct == "perfect":  # the set against itself
            assert floor[name] == pytest.approx(0.0, abs=1e-6)
        else:  # independently: scipy's FID of the real features against those of as many grey images
            grey = features(torch.full_like(real, 0.5)).numpy()
            assert floor[name] == pytest.approx(scipy_frechet_distance(features(real).numpy(), grey), rel=1e-6)
            assert floor[name] > 0


class OneImageVae(StandInVae):
    """A perfect stand-in VAE that runs out of memory on more than one image at a time, and records the autocast
    state and input dtype of each decode."""

    def __init__(self) -> None:
        super().__init__(lambda z: z)
        self.decodes: list[tuple[bool, torch.dtype | None]] = []

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        if len(latents) > 1:
            raise torch.cuda.OutOfMemoryError(f"decoding {len(latents)} images at once")
        autocast = torch.is_autocast_enabled("cpu")
        self.decodes.append((autocast, torch.get_autocast_dtype("cpu") if autocast else None))
        return super().decode(latents)


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_autoencoder_floor_decodes_as_sampling_does_one_image_at_a_time_under_its_autocast(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor, monkeypatch, autocast
):
    """The floor runs right after the M generated images: decoding fidelity.batch_size images at once in float32
    (the old floor) ran out of memory where sampling, one image at a time under fidelity.autocast, did not."""
    module, evaluation = tiny_evaluation(
        tiny_model_dir,
        held_out_root,
        tmp_path / "cache",
        "fidelity.extractors=[domain,linear]",
        f"fidelity.autocast={autocast or 'null'}",
    )
    vae = OneImageVae()
    parts = module.evaluation_parts()
    monkeypatch.setattr(module, "evaluation_parts", lambda: replace(parts, vae=vae))
    floor = evaluation.autoencoder_floor(module, evaluation.reference())
    assert len(vae.decodes) == evaluation.num_images  # every image, one by one
    expected = (True, torch.bfloat16) if autocast else (False, None)
    assert set(vae.decodes) == {expected}
    if autocast is None:  # a perfect VAE in float32: the set against itself
        assert floor == {"domain": pytest.approx(0.0, abs=1e-6), "linear": pytest.approx(0.0, abs=1e-6)}


def test_evaluate_fidelity_writes_fid_before_the_floor_and_reports_a_failed_floor_as_missing(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor, monkeypatch, caplog
):
    """An out-of-memory error in the optional autoencoder floor, after M images were generated, used to lose the
    whole evaluation: now fidelity.json/md hold the FID, and the floor is named missing, with the error logged."""
    load = metrics.fidelity_evaluation.load_diffusion_module

    def load_with_a_vae_that_cannot_encode(*args, **kwargs):
        module, cfg = load(*args, **kwargs)

        def out_of_memory(*_, **__):  # only the floor encodes: generation decodes latents and never encodes
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        module.vae.encode = out_of_memory
        return module, cfg

    monkeypatch.setattr(metrics.fidelity_evaluation, "load_diffusion_module", load_with_a_vae_that_cannot_encode)
    out = tmp_path / "eval"
    arguments = ["fidelity", "--model", str(tiny_model_dir), "--out", str(out), "--num-images", "6"]
    arguments += ["--extractors", "domain,linear", "--device", "cpu", *fidelity_overrides(held_out_root, tmp_path)]
    with caplog.at_level("ERROR"):
        evaluate.main([*arguments, "fidelity.num_inference_steps=2", *TINY_MODEL])

    summary = json.loads((out / "fidelity.json").read_text())
    assert summary["metrics"]["fid/domain@6"] > 0 and summary["metrics"]["fid/linear@6"] > 0
    assert summary["autoencoder_floor_fid"] == {}
    assert summary["autoencoder_floor_missing"].startswith("failed: OutOfMemoryError: CUDA out of memory")
    markdown = (out / "fidelity.md").read_text()
    assert "| fid/domain@6 |" in markdown and "VAE reconstructions" not in markdown
    assert "autoencoder floor: missing (failed: OutOfMemoryError: CUDA out of memory" in markdown
    assert "autoencoder floor" in caplog.text and "Tried to allocate 2.00 GiB" in caplog.text


def test_features_and_scores_are_full_precision_inside_autocast():
    extractor = LinearFeatures()
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(images[:, 0, 0], torch.eye(16)).dtype == torch.bfloat16  # autocast is on
        inside, scores_inside = extractor(images), extractor.finding_scores(images.bfloat16())
    assert inside.dtype == torch.float64 and scores_inside.dtype == torch.float32
    assert torch.equal(inside, extractor(images))
    assert torch.equal(scores_inside, extractor.finding_scores(images.bfloat16().float()))


def test_both_fids_come_from_one_generation_and_equal_each_extractor_alone(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor, monkeypatch
):
    cache = tmp_path / "cache"
    module, both = tiny_evaluation(tiny_model_dir, held_out_root, cache, "fidelity.extractors=[domain,linear]")
    calls = []
    real_sample = module.sample

    def counting_sample(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real_sample(prompts, *args, **kwargs)

    monkeypatch.setattr(module, "sample", counting_sample)
    together = both.evaluate(module, both.build_metrics(both.reference())).metrics
    # M = 6 at batch 4: 2 FID batches (4 + 2 prompts), and 1 diversity prompt x 2 images; nothing generated twice.
    assert calls == [4, 2, 2]
    assert {"fid/domain@6", "fid/linear@6"} <= set(together)
    assert together["fid/domain@6"] != together["fid/linear@6"]
    for name in ("domain", "linear"):
        _, alone = tiny_evaluation(tiny_model_dir, held_out_root, cache, f"fidelity.extractors=[{name}]")
        single = alone.evaluate(module, alone.build_metrics(alone.reference())).metrics
        assert set(single) & {"fid/domain@6", "fid/linear@6"} == {f"fid/{name}@6"}
        assert single[f"fid/{name}@6"] == pytest.approx(together[f"fid/{name}@6"], rel=1e-12)
    assert calls == [4, 2, 2] * 3


def test_bf16_autocast_generation_gives_finite_images_and_float64_fid(
    tiny_model_dir, held_out_root, tmp_path, with_linear_extractor, monkeypatch
):
    cache = tmp_path / "cache"
    module, evaluation = tiny_evaluation(
        tiny_model_dir, held_out_root, cache, "fidelity.autocast=bf16", "fidelity.extractors=[linear]"
    )
    in_unet = []
    module.unet.register_forward_pre_hook(
        lambda *_: in_unet.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    generated = []
    real_sample = module.sample

    def recording_sample(*args, **kwargs):
        generated.append(real_sample(*args, **kwargs))
        return generated[-1]

    monkeypatch.setattr(module, "sample", recording_sample)
    metrics = evaluation.build_metrics(evaluation.reference())
    result = evaluation.evaluate(module, metrics)
    assert len(generated) == 3 and len(in_unet) == 3 * 2  # 3 sampling calls of 2 DDIM steps
    assert set(in_unet) == {(True, torch.bfloat16)}
    assert all(torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1 for images in generated)
    assert metrics.fids["linear"].fake_features_sum.dtype == torch.float64
    assert math.isfinite(result.metrics["fid/linear@6"]) and result.metrics["fid/linear@6"] > 0
    in_unet.clear()
    settings = evaluation.settings
    fp32_first_batch = real_sample(evaluation.captions[:4], 2, settings.guidance_scale, settings.seed)
    assert set(in_unet) == {(False, torch.bfloat16)}  # the default (null): no autocast
    assert not torch.equal(generated[0], fp32_first_batch)  # bf16 really reached the networks
    assert (generated[0] - fp32_first_batch).abs().max() < 0.1  # ... and changed them only by rounding


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fidelity.extractors=[domain,domain]", "distinct names"),
        ("fidelity.extractors=[fancy]", "fidelity.extractors must be a list"),
        ("fidelity.extractors=domain", "fidelity.extractors must be a list"),
        ("fidelity.autocast=fp32", "fidelity.autocast must be one of"),
    ],
)
def test_bad_fidelity_settings_are_named(held_out_root, tmp_path, override, message):
    cfg = load_config([], [*fidelity_overrides(held_out_root, tmp_path / "cache"), override])
    with pytest.raises(ValueError, match=message):
        FidelityEvaluation(cfg, held_out_root, 6)


def test_missing_weights_of_every_extractor_are_listed_in_one_error_before_any_work(held_out_root, tmp_path):
    absent = tmp_path / "absent.pt"
    cfg = load_config(
        [],
        [
            *fidelity_overrides(held_out_root, tmp_path / "cache"),
            "fidelity.extractors=[domain,inception,xrv]",
            f"fidelity.xrv_weights={absent}",
        ],
    )
    with pytest.raises(MissingFeatureExtractorError) as error:
        FidelityEvaluation(cfg, held_out_root, 6)
    message = str(error.value)
    assert "fidelity.inception_weights is not set" in message
    assert f"fidelity.xrv_weights={absent} does not exist: place " in message
    assert not (tmp_path / "cache").exists()  # no classifier trained, no reference extracted
