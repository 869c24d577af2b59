"""LoRA adapters (peft) on the denoiser and the text encoder: add them, strip or merge them, export them for diffusers.

Why LoRA beside full training: the people we build for fine-tune with low-rank adapters (diffusers' LoRA example,
kohya's sd-scripts), and the paper's question (does training the text encoder cost grounding?) has a LoRA variant.
An adapted part keeps its base weights frozen (shared, never in checkpoints) and trains only the adapter weights,
which stay inside the part as peft layers: every forward pass, the attention capture's included, runs them.

Export is done on copies whose base tensors are shared with the part (no second model in memory): ``plain_copy``
strips the adapters (the base model the adapter files load onto) or merges them into the base weights (a plain
diffusers/transformers model that needs no peft). The adapter files take the form the backbone's pipeline loads:
diffusers' LoRA weights where the pipeline has a LoRA loader (``StableDiffusionPipeline.load_lora_weights``), else
peft's adapter folders (``write_peft_adapters``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import CONFIG_NAME as PEFT_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from configs import ConfigError
from lightning_modules.backbones import Backbone

# Attention projections of each text-encoder family (``config.model_type``), the default LoRA targets.
TEXT_ENCODER_ATTENTION = {
    "clip_text_model": ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP, SD 2's OpenCLIP (CLIPTextModel)
    "bert": ("query", "key", "value", "attention.output.dense"),  # BERT / MiniLM (the embedded default)
    "t5": ("q", "k", "v", "o"),  # T5 (PixArt-Σ's T5EncoderModel): its attention's projections
}
LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)  # what peft's LoRA wraps (and a target must name)
ADAPTER_NAME = "default"
PEFT_MODEL_PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped model: its saved keys start so
# A part's peft adapter folder is <pipeline folder>/<part>_lora (transformer_lora), beside the part's own subfolder,
# which diffusers and transformers then load as a plain model.
PEFT_ADAPTER_SUFFIX = "_lora"


@dataclass(frozen=True)
class LoraSettings:
    """One part's adapter (``model.adapters.<part>``); ``target_modules`` None: the part's attention projections."""

    rank: int
    alpha: float
    dropout: float
    learning_rate: float
    target_modules: tuple[str, ...] | None = None


def adapter_settings(adapters_cfg: Mapping) -> dict[str, LoraSettings]:
    """``model.adapters`` as settings per adapted part (those listed in ``model.adapters.parts``)."""
    settings = {}
    for name in adapters_cfg["parts"]:
        part = adapters_cfg[name]
        targets = part["target_modules"]
        settings[name] = LoraSettings(
            rank=int(part["rank"]),
            alpha=float(part["alpha"]),
            dropout=float(part["dropout"]),
            learning_rate=float(part["learning_rate"]),
            target_modules=None if targets is None else tuple(str(target) for target in targets),
        )
    return settings


def default_target_modules(part_name: str, part: nn.Module, backbone: Backbone) -> tuple[str, ...]:
    """The denoiser's attention projections (the backbone's), or the text encoder family's (CLIP and BERT differ)."""
    if part_name == backbone.part:
        return backbone.lora_target_modules
    model_type = getattr(getattr(part, "config", None), "model_type", None)
    if model_type not in TEXT_ENCODER_ATTENTION:
        raise ConfigError(
            f"model.adapters.text_encoder.target_modules: no default for a text encoder of type '{model_type}' "
            f"(known: {sorted(TEXT_ENCODER_ATTENTION)}); name its attention projections, e.g. one of "
            f"{layer_names(part)}"
        )
    return TEXT_ENCODER_ATTENTION[model_type]


def layer_names(part: nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap, as ``target_modules`` names them (``to_q``, ``to_out.0``)."""
    names = set()
    for name, module in part.named_modules():
        if isinstance(module, LORA_LAYER_TYPES):
            pieces = name.split(".")
            names.add(".".join(pieces[-2:]) if pieces[-1].isdigit() and len(pieces) > 1 else pieces[-1])
    return sorted(names)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole name, or its last dotted components."""
    return module_name == target or module_name.endswith(f".{target}")


def check_target_modules(part_name: str, part: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target must name at least one layer LoRA can wrap: a typo would otherwise train nothing there."""
    layers = [name for name, module in part.named_modules() if isinstance(module, LORA_LAYER_TYPES)]
    unmatched = [target for target in targets if not any(_matches(name, target) for name in layers)]
    if unmatched:
        raise ConfigError(
            f"model.adapters.{part_name}.target_modules: {unmatched} match no linear, convolution or embedding "
            f"layer of the {type(part).__name__}; its layers are named {layer_names(part)}"
        )


def add_lora(part_name: str, part: nn.Module, settings: LoraSettings, backbone: Backbone) -> LoraConfig:
    """Freeze ``part`` and wrap its target layers in LoRA layers whose weights train (B starts at zero, so the
    adapted part computes what the base does). Draws A's initial values from the global generator."""
    targets = settings.target_modules or default_target_modules(part_name, part, backbone)
    check_target_modules(part_name, part, targets)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        init_lora_weights=True,
    )
    part.requires_grad_(False)
    # peft's own injection for both families: transformers' add_adapter demands a newer peft than diffusers does.
    inject_adapter_in_model(config, part, ADAPTER_NAME)
    part.peft_config = {ADAPTER_NAME: config}  # where peft's get_peft_model_state_dict reads the adapter's config
    return config


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter weight (``...to_q.lora_A.default.weight``)."""
    return ".lora_" in key


def check_adapters_reached(part_name: str, part: nn.Module, unreached: list[str]) -> None:
    """Some adapter weight of ``part`` must get a gradient from the objective (``unreached``: the parameter names
    ``objective_reach`` found none for); otherwise the adapter trains nothing, say on BERT's unused pooler."""
    adapters = [name for name, parameter in part.named_parameters() if is_adapter_key(name) and parameter.requires_grad]
    if adapters and set(adapters) <= set(unreached):
        layers = sorted({name.split(".lora_")[0] for name in adapters})
        raise ConfigError(
            f"model.adapters.{part_name}.target_modules: the diffusion objective reaches none of the adapted layers "
            f"{layers}, so the adapter would train nothing; adapt layers that the {type(part).__name__}'s output "
            f"depends on (null: its attention projections)"
        )


def plain_copy(part: nn.Module, merge: bool) -> nn.Module:
    """``part`` without its LoRA layers, each replaced by its base layer: with the LoRA update added to the base
    weights (``merge``) or not (the base model). Every tensor but the merged ones is shared with ``part``."""
    tuner_layers = [module for module in part.modules() if isinstance(module, BaseTunerLayer)]
    merged_ids = {id(p) for layer in tuner_layers for p in layer.get_base_layer().parameters()} if merge else set()
    twin = copy.deepcopy(part, memo={id(p): p for p in part.parameters() if id(p) not in merged_ids})
    for name, module in list(twin.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                with torch.no_grad():
                    module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name), child, module.get_base_layer())
    twin.__dict__.pop("peft_config", None)
    twin._hf_peft_config_loaded = False  # transformers would otherwise save the adapter alone
    return twin


def lora_metadata(part: nn.Module) -> dict:
    """The part's LoraConfig as diffusers stores it beside the weights, so that ``load_lora_weights`` rebuilds
    exactly this adapter (rank, alpha, targets) instead of guessing from CLIP-only layer names."""
    config = part.peft_config[ADAPTER_NAME].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def text_encoder_lora_keys(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's ``lora_A``/``lora_B`` keys in diffusers' text-encoder format (``lora_linear_layer.down``/``up``).

    diffusers' own conversion knows CLIP's layer names only and leaves BERT's keys unconverted, which its loader
    then refuses; its loader maps ``lora_linear_layer`` back for any name, and the stored LoraConfig (metadata)
    names the targets, so BERT encoders load too. For CLIP the keys equal diffusers' own.
    """
    renamed = {".lora_A.": ".lora_linear_layer.down.", ".lora_B.": ".lora_linear_layer.up."}
    converted = {}
    for key, value in weights.items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        converted[key] = value
    return converted


def write_lora_weights(
    folder: str | Path, parts: Mapping[str, nn.Module], pipeline_class: type[DiffusionPipeline]
) -> Path:
    """``pytorch_lora_weights.safetensors`` in diffusers' format, for ``pipeline_class.load_lora_weights``."""
    layers, metadata = {}, {}
    for name, part in parts.items():
        weights = get_peft_model_state_dict(part)
        layers[f"{name}_lora_layers"] = (
            convert_state_dict_to_diffusers(weights) if name == "unet" else text_encoder_lora_keys(weights)
        )
        metadata[f"{name}_lora_adapter_metadata"] = lora_metadata(part)
    pipeline_class.save_lora_weights(folder, **layers, **metadata, safe_serialization=True)
    return Path(folder)


def write_peft_adapters(folder: str | Path, parts: Mapping[str, nn.Module]) -> Path:
    """Each part's adapter as ``PeftModel.save_pretrained`` writes it, in ``<folder>/<part>_lora``:
    ``adapter_model.safetensors`` (keys under ``base_model.model.``) and ``adapter_config.json`` (inference mode,
    naming the part's class).

    For pipelines diffusers has no LoRA loader for: in diffusers 0.42 neither ``PixArtSigmaPipeline`` (no
    ``*LoraLoaderMixin``) nor ``PixArtTransformer2DModel`` (no ``PeftAdapterMixin``, so no ``load_lora_adapter``)
    loads LoRA weights. PixArt-sigma's own LoRA recipe (``train_scripts/train_pixart_lora_hf.py``, loaded as its
    ``asset/docs/pixart_lora.md`` shows) saves the transformer's adapter with peft and loads it with
    ``PeftModel.from_pretrained(transformer, folder)``; a text encoder's loads the same way, or with transformers'
    ``load_adapter``. Written from the part itself, not through a ``PeftModel`` wrapper, whose construction would
    draw fresh adapter weights from the global generator.
    """
    for name, part in parts.items():
        target = Path(folder) / f"{name}{PEFT_ADAPTER_SUFFIX}"
        target.mkdir(parents=True, exist_ok=True)
        weights = {
            f"{PEFT_MODEL_PREFIX}{key}": value.contiguous() for key, value in get_peft_model_state_dict(part).items()
        }
        save_file(weights, target / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        config = copy.deepcopy(part.peft_config[ADAPTER_NAME])
        config.inference_mode = True
        base_class = {"base_model_class": type(part).__name__, "parent_library": type(part).__module__}
        config.save_pretrained(target, auto_mapping_dict=base_class)
    return Path(folder)


def holds_adapters(folder: str | Path) -> bool:
    """Whether a pipeline folder is an adapter export (diffusers LoRA weights or peft adapter folders beside it),
    whose pipeline is the adapters' base rather than the trained model."""
    folder = Path(folder)
    return (folder / LORA_WEIGHT_NAME_SAFE).is_file() or any(folder.glob(f"*{PEFT_ADAPTER_SUFFIX}/{PEFT_CONFIG_NAME}"))
