"""The domain finding classifier: labels, held-out AUROC on the synthetic set, seeding, caching, its extractor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import metrics.domain_classifier as domain_classifier
from configs import load_config
from datamodules.mimic import CHEXPERT_LABELS, build_mimic_index
from datamodules.synthetic import ensure_synthetic_dataset
from metrics.domain_classifier import (
    FINDINGS,
    ensure_domain_classifier,
    finding_aurocs,
    finding_scores,
    finding_targets,
    load_labelled_images,
    train_finding_classifier,
)
from metrics.feature_extractors import build_feature_extractor

AUROC_FLOOR = 0.8  # mean held-out AUROC; an untrained network scores about 0.5
RECIPE = {"width": 16, "steps": 150, "batch_size": 32, "learning_rate": 3e-3, "weight_decay": 1e-4, "max_shift": 2}


@pytest.fixture(scope="module")
def classifier_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("classifier-data"), n=400, resolution=48, seed=0)


def test_finding_targets_take_the_eight_ms_cxr_columns_with_uncertain_kept_apart():
    labels = torch.full((1, len(CHEXPERT_LABELS)), float("nan"))
    labels[0, CHEXPERT_LABELS.index("Cardiomegaly")] = 1.0
    labels[0, CHEXPERT_LABELS.index("Edema")] = 0.0
    labels[0, CHEXPERT_LABELS.index("Pneumothorax")] = -1.0
    labels[0, CHEXPERT_LABELS.index("No Finding")] = 1.0  # not one of the eight
    targets = finding_targets(labels)[0]
    expected = dict.fromkeys(FINDINGS, 0.0) | {"Cardiomegaly": 1.0, "Pneumothorax": -1.0}
    assert targets.tolist() == [expected[finding] for finding in FINDINGS]


def test_finding_aurocs_leave_out_uncertain_labels_and_one_class_findings():
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]).repeat(1, 4)
    scores = torch.tensor([[0.9, 0.5], [0.1, 0.5], [0.0, 0.5], [0.8, 0.5]]).repeat(1, 4)
    aurocs = finding_aurocs(scores, targets)
    assert aurocs[FINDINGS[0]] == 1.0  # the uncertain row (score 0) would otherwise break the ranking
    assert math.isnan(aurocs[FINDINGS[1]])  # no positives
    assert aurocs["mean"] == 1.0


def test_classifier_reaches_the_auroc_floor_on_the_synthetic_held_out_splits(classifier_root):
    images, targets = load_labelled_images(build_mimic_index(classifier_root, split="train"), 32)
    held_out = [load_labelled_images(build_mimic_index(classifier_root, split=s), 32) for s in ("validate", "test")]
    held_out_images, held_out_targets = torch.cat([h[0] for h in held_out]), torch.cat([h[1] for h in held_out])
    assert (held_out_targets == 1).sum(dim=0).min() >= 5  # every finding has positives to rank

    trained = train_finding_classifier(images, targets, seed=0, **RECIPE)
    untrained = train_finding_classifier(images, targets, seed=0, **(RECIPE | {"steps": 1}))
    trained_auroc = finding_aurocs(finding_scores(trained, held_out_images), held_out_targets)["mean"]
    untrained_auroc = finding_aurocs(finding_scores(untrained, held_out_images), held_out_targets)["mean"]
    assert trained_auroc >= AUROC_FLOOR
    assert untrained_auroc < AUROC_FLOOR - 0.15


def test_training_is_seeded(classifier_root):
    images, targets = load_labelled_images(build_mimic_index(classifier_root, split="train"), 32, max_images=64)
    recipe = RECIPE | {"steps": 5}
    first = train_finding_classifier(images, targets, seed=3, **recipe).state_dict()
    second = train_finding_classifier(images, targets, seed=3, **recipe).state_dict()
    other = train_finding_classifier(images, targets, seed=4, **recipe).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_training_leaves_the_callers_random_stream_alone(classifier_root):
    """Trained on process 0 in the middle of a diffusion run (or found cached): the run's stream must not notice."""
    images, targets = load_labelled_images(build_mimic_index(classifier_root, split="train"), 32, max_images=16)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    train_finding_classifier(images, targets, seed=3, **(RECIPE | {"steps": 1}))
    assert torch.equal(torch.rand(4), expected)


def test_classifier_is_cached_by_data_and_recipe_and_serves_as_frozen_extractor(classifier_root, tmp_path, monkeypatch):
    trainings = []
    original = domain_classifier.train_and_cache_domain_classifier

    def counting(cfg, root):
        trainings.append(cfg.fidelity.domain_classifier.resolution)
        return original(cfg, root)

    monkeypatch.setattr(domain_classifier, "train_and_cache_domain_classifier", counting)
    overrides = [
        f"data.cache_dir={tmp_path}",
        "fidelity.domain_classifier.resolution=32",
        "fidelity.domain_classifier.steps=3",
        "fidelity.domain_classifier.max_images=64",
    ]
    folder = ensure_domain_classifier(load_config([], overrides), classifier_root)
    assert ensure_domain_classifier(load_config([], overrides), classifier_root) == folder
    assert trainings == [32]
    other = ensure_domain_classifier(
        load_config([], [*overrides, "fidelity.domain_classifier.resolution=24"]), classifier_root
    )
    assert other != folder and trainings == [32, 24]

    extractor = build_feature_extractor("domain", domain_classifier_folder=folder)
    assert not any(parameter.requires_grad for parameter in extractor.parameters())  # DDP-safe
    assert not extractor.train().training  # never leaves eval mode
    images = torch.rand(3, 3, 40, 40)  # another resolution than the classifier's: resized inside
    features = extractor(images)
    assert features.shape == (3, extractor.num_features) and features.dtype == torch.float64
    assert extractor.finding_scores(images).shape == (3, len(FINDINGS))
