"""The networks FID is computed on, behind one interface and chosen by name (``fidelity.extractors``).

- ``domain``: the project's own finding classifier (``metrics.domain_classifier``), penultimate features; works
  offline on any configured data, including the embedded synthetic set.
- ``inception``: Inception-v3 pool features (2048-d) exactly as torchmetrics computes them (torch-fidelity's
  network; uint8 input normalised once inside it).
- ``xrv``: torchxrayvision DenseNet-121 ``densenet121-res224-all`` pooled features (1024-d) on grayscale 224 px
  input with intensities in [-1024, 1024].

``inception`` and ``xrv`` need the optional ``gpu-metrics`` extra (it pulls torchvision, and with it a CUDA torch)
and a local weights file: both are checked before anything is imported or loaded, and what is missing is named
in one error. Nothing is ever downloaded.

Every extractor is frozen and stays in eval mode (a trainable feature net breaks DDP's unused-parameter check):
images (N, C, H, W) in [0, 1] in, (N, num_features) float64 features out, computed in float32 even inside an
autocast region (generation may run in bf16; the features and their statistics never do). ``domain`` and ``xrv``
are finding classifiers too: ``finding_scores`` gives their probabilities for the 8 MS-CXR findings (classifier
agreement).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metrics.domain_classifier import FINDINGS, WEIGHTS_FILE, load_domain_classifier, to_classifier_input

EXTRACTORS = ("domain", "inception", "xrv")
GPU_METRICS_EXTRA = "pip install 'cxr-diffusion[gpu-metrics]'"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
XRV_WEIGHTS_NAME = "densenet121-res224-all"
XRV_WEIGHTS_URL = (
    "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
)
# torchxrayvision's output labels that name the MS-CXR findings (it calls a pleural effusion "Effusion").
XRV_LABEL_OF_FINDING = {finding: finding for finding in FINDINGS} | {"Pleural Effusion": "Effusion"}


class MissingFeatureExtractorError(RuntimeError):
    """An optional feature network cannot be built offline: says what to install or which file to place where."""


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _require(extractor: str, package: str, weights: str | Path | None, config_key: str, url: str) -> Path:
    """Check the package and the weights file before importing or loading anything; one error lists all gaps."""
    problems = []
    if importlib.util.find_spec(package) is None:
        problems.append(
            f"the Python package '{package}' is not installed: {GPU_METRICS_EXTRA} "
            "(on a GPU machine: it pulls torchvision and a CUDA build of torch)"
        )
    file_name = url.rsplit("/", 1)[-1]
    if weights is None:
        problems.append(f"{config_key} is not set: download {url} once and set {config_key}=/path/to/{file_name}")
    elif not Path(weights).is_file():
        problems.append(f"{config_key}={weights} does not exist: place {file_name} there (from {url})")
    if problems:
        listed = "".join(f"\n  - {problem}" for problem in problems)
        raise MissingFeatureExtractorError(
            f"the '{extractor}' feature extractor is unavailable (nothing is downloaded):{listed}"
        )
    return Path(weights)


class FeatureExtractor(nn.Module):
    """Frozen, always in eval mode: (N, C, H, W) images in [0, 1] -> (N, num_features) float64 features.

    ``identity`` names the network and its weights (for cache keys); ``findings`` lists what ``finding_scores``
    returns, empty when the network is no finding classifier.
    """

    name: str = ""
    num_features: int = 0
    findings: tuple[str, ...] = ()

    def __init__(self, identity: str) -> None:
        super().__init__()
        self.identity = identity

    def freeze(self) -> FeatureExtractor:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self.features(images.float()).double()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def finding_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(N, len(findings)) probabilities of each finding, in float32 (outside any autocast region)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.finding_probabilities(images.float()).float()

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"the '{self.name}' feature extractor is no finding classifier")


class DomainFeatures(FeatureExtractor):
    """The project's finding classifier: pooled penultimate activations; its sigmoid outputs score findings."""

    name = "domain"
    findings = FINDINGS

    def __init__(self, classifier_folder: str | Path) -> None:
        super().__init__(f"domain-{file_digest(Path(classifier_folder) / WEIGHTS_FILE)}")
        self.classifier = load_domain_classifier(classifier_folder)
        self.num_features = self.classifier.num_features
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_classifier_input(images, self.classifier.resolution))

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.classifier(to_classifier_input(images, self.classifier.resolution)))


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 (2048-d) via torchmetrics' NoTrainInceptionV3 from a local torch-fidelity weights file."""

    name = "inception"
    num_features = 2048

    def __init__(self, weights: str | Path | None) -> None:
        weights = _require(self.name, "torch_fidelity", weights, "fidelity.inception_weights", INCEPTION_WEIGHTS_URL)
        super().__init__(f"inception-{file_digest(weights)}")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(weights),
        )
        self.freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # The network takes uint8 and normalises to [-1, 1] itself: the one and only normalisation.
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.network(pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels)


class XrvFeatures(FeatureExtractor):
    """torchxrayvision DenseNet-121 (densenet121-res224-all): 1024-d pooled features, 18 pathology outputs."""

    name = "xrv"
    num_features = 1024
    findings = FINDINGS
    resolution = 224

    def __init__(self, weights: str | Path | None) -> None:
        weights = _require(self.name, "torchxrayvision", weights, "fidelity.xrv_weights", XRV_WEIGHTS_URL)
        super().__init__(f"xrv-{file_digest(weights)}")
        import torchxrayvision

        labels = list(torchxrayvision.models.model_urls[XRV_WEIGHTS_NAME]["labels"])
        self.network = torchxrayvision.models.DenseNet(weights=None, num_classes=len(labels))
        # The release file is a pickled model (trusted: the user placed it); a plain state dict works too.
        saved = torch.load(weights, map_location="cpu", weights_only=False)
        self.network.load_state_dict(saved.state_dict() if isinstance(saved, nn.Module) else saved)
        self.register_buffer(
            "finding_columns", torch.tensor([labels.index(XRV_LABEL_OF_FINDING[f]) for f in FINDINGS]), persistent=False
        )
        self.freeze()

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """Grayscale, 224 x 224, intensities scaled from [0, 1] to [-1024, 1024] as torchxrayvision expects."""
        gray = images.float().mean(dim=1, keepdim=True)
        if gray.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            gray = F.interpolate(gray, size=size, mode="bilinear", antialias=True, align_corners=False)
        return gray.clamp(0, 1) * 2048 - 1024

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.network.features(self.network_input(images))
        return F.adaptive_avg_pool2d(F.relu(maps), 1).flatten(1)

    def finding_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network.classifier(self.features(images))
        return torch.sigmoid(logits[:, self.finding_columns])


def build_feature_extractor(
    name: str,
    domain_classifier_folder: str | Path | None = None,
    inception_weights: str | Path | None = None,
    xrv_weights: str | Path | None = None,
) -> FeatureExtractor:
    """The extractor called ``name`` (one of EXTRACTORS), frozen and in eval mode."""
    if name == "domain":
        if domain_classifier_folder is None:
            raise ValueError("the 'domain' feature extractor needs the trained classifier's folder")
        return DomainFeatures(domain_classifier_folder)
    if name == "inception":
        return InceptionFeatures(inception_weights)
    if name == "xrv":
        return XrvFeatures(xrv_weights)
    raise ValueError(f"unknown feature extractor '{name}': expected one of {EXTRACTORS}")
