"""FID, classifier agreement, diversity, the reference-statistics cache, the offline extractors' errors, the CLI."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

import evaluate
from configs import load_config
from datamodules.synthetic import ensure_synthetic_dataset
from metrics.domain_classifier import FINDINGS
from metrics.feature_extractors import FeatureExtractor, MissingFeatureExtractorError, build_feature_extractor
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

    def finding_scores(self, images: torch.Tensor) -> torch.Tensor:
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
    metrics = FidelityMetrics(extractor, scorer=extractor, num_images=12, measure_diversity=False)
    metrics.load_reference(FeatureStatistics.of(extractor(torch.rand(20, 3, 16, 16))))
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
    first = FidelityEvaluation(load_config([], base), held_out_root, 8).reference()
    again = FidelityEvaluation(load_config([], base), held_out_root, 8).reference()
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


def test_evaluate_fidelity_writes_json_markdown_and_grid(tiny_model_dir, held_out_root, tmp_path):
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
    assert summary["num_images"] == 6 and summary["extractor"] == "domain"
    assert metrics["fid/domain@6"] > 0
    assert 0 <= metrics["agreement/domain/auroc_mean"] <= 1
    assert 0 <= metrics["diversity/ms_ssim"] <= 1
    assert summary["real_halves_fid"] >= 0
    markdown = (out / "fidelity.md").read_text()
    assert "fid/domain@6" in markdown and "half vs half" in markdown
    assert (out / "samples.png").stat().st_size > 0
