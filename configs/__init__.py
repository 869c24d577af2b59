"""Configuration: the default schema, experiment presets and command-line overrides merged in one place.

`load_config(files, overrides)` merges ``default.yaml`` ← each file ← ``key=value`` overrides. Every key must
already exist in ``default.yaml`` (``trainer`` keys must be ``lightning.Trainer`` arguments), so a typo fails
loudly with the closest valid key instead of being silently ignored.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
STAGES = ("all", "autoencoder", "diffusion")
DENOISER_PARTS = {"unet": "unet", "pixart": "transformer"}  # model.backbone -> its denoiser's part name
TRAINABLE_PARTS = (*dict.fromkeys(DENOISER_PARTS.values()), "text_encoder", "vae")
ADAPTABLE_PARTS = (*dict.fromkeys(DENOISER_PARTS.values()), "text_encoder")  # parts LoRA adapters exist for
# Keys an older release wrote into run folders' config.yaml: (new key, how the old value becomes the new one).
RENAMED_KEYS = {"fidelity.extractor": ("fidelity.extractors", lambda value: [value])}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used, with where it came from."""


def _required(key: str, what: str) -> None:
    """``${required:key,what}`` in a preset: the user must set ``key`` (in a later file or on the command line)."""
    raise ConfigError(f"{key} must be set: {what} (e.g. on the command line: {key}=...)")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_resolver("required", _required)


def _trainer_arguments() -> list[str]:
    from lightning import Trainer

    return [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]


def _closest(key: str, candidates: Iterable[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(key, [str(c) for c in candidates], n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{matches[0]}'?" if matches else ""


def _check_known_keys(new: DictConfig, base: DictConfig, source: str, prefix: str = "") -> None:
    for key in new:
        path = f"{prefix}{key}"
        if prefix == "" and key == "trainer":
            valid = _trainer_arguments()
            for trainer_key in new.trainer:
                if trainer_key not in valid:
                    raise ConfigError(
                        f"unknown config key 'trainer.{trainer_key}' in {source}: not a lightning.Trainer "
                        f"argument{_closest(str(trainer_key), valid, 'trainer.')}"
                    )
            continue
        if key not in base:
            hint = _closest(str(key), base.keys(), prefix) or f"; expected one of {[str(k) for k in base]}"
            raise ConfigError(f"unknown config key '{path}' in {source}{hint}")
        new_value, base_value = new._get_node(key), base._get_node(key)
        if isinstance(new_value, DictConfig) and isinstance(base_value, DictConfig):
            _check_known_keys(new_value, base_value, source, prefix=f"{path}.")


def _migrate_renamed_keys(file_cfg: DictConfig) -> None:
    """A run folder written before a key was renamed still loads (evaluate.py, resume): its old keys move over."""
    for old, (new, convert) in RENAMED_KEYS.items():
        parent_key, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(file_cfg, parent_key)
        if isinstance(parent, DictConfig) and leaf in parent:
            value = parent.pop(leaf)
            if OmegaConf.select(file_cfg, new) is None:
                OmegaConf.update(file_cfg, new, convert(value), force_add=True)


def _resolve_config_file(name: str | Path) -> Path:
    """Accept a path, or a preset name relative to configs/ (``experiment/learnable_text_encoder``)."""
    path = Path(name)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file '{name}' not found (looked for it as a path and under {CONFIG_DIR})")


def _validate_values(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got '{cfg.stage}'")
    trainable = cfg.model.trainable
    if not isinstance(trainable, ListConfig) or not set(trainable) <= set(TRAINABLE_PARTS):
        raise ConfigError(f"model.trainable must be a list drawn from {TRAINABLE_PARTS}, got {trainable}")
    _validate_adapters(cfg.model.adapters, trainable)
    _validate_denoiser_part(cfg.model)
    if not 0.0 <= cfg.train.ucg_probability <= 1.0:
        raise ConfigError(f"train.ucg_probability must be in [0, 1], got {cfg.train.ucg_probability}")
    if cfg.model.prediction_type not in (None, "epsilon", "v_prediction"):
        raise ConfigError(
            f"model.prediction_type must be null (the pretrained scheduler's), epsilon or v_prediction, "
            f"got '{cfg.model.prediction_type}'"
        )
    chunk = cfg.train.text_feature_batch_size
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ConfigError(f"train.text_feature_batch_size must be null (by device) or an integer >= 1, got {chunk!r}")
    limit = cfg.train.checkpoints_total_limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigError(f"train.checkpoints_total_limit must be null (keep all) or an integer >= 0, got {limit!r}")
    if cfg.data.caption_section not in ("impression", "findings", "both"):
        raise ConfigError(
            f"data.caption_section must be impression, findings or both, got '{cfg.data.caption_section}'"
        )


def _validate_denoiser_part(model: DictConfig) -> None:
    """``model.backbone`` is known, and ``model.trainable``/``model.adapters.parts`` name its denoiser part
    (``transformer`` for pixart). A null backbone with a pipeline folder is checked once the folder is read."""
    if model.backbone is not None and model.backbone not in DENOISER_PARTS:
        raise ConfigError(
            f"model.backbone must be null (detected) or one of {list(DENOISER_PARTS)}, got '{model.backbone}'"
        )
    if model.backbone is None and model.pretrained:
        return
    denoiser = DENOISER_PARTS[model.backbone or "unet"]
    for key, parts in (("model.trainable", model.trainable), ("model.adapters.parts", model.adapters.parts)):
        others = [name for name in parts if name in DENOISER_PARTS.values() and name != denoiser]
        if others:
            raise ConfigError(
                f"{key} names {others}, but the {model.backbone or 'unet'} backbone's denoiser part is "
                f"'{denoiser}' (model.backbone={model.backbone})"
            )


def _validate_adapters(adapters: DictConfig, trainable: ListConfig) -> None:
    """``model.adapters``: which parts (LoRA exists for the UNet and the text encoder) and each one's settings."""
    parts = adapters.parts
    if not isinstance(parts, ListConfig) or not set(parts) <= set(ADAPTABLE_PARTS):
        unknown = sorted(set(parts) - set(ADAPTABLE_PARTS)) if isinstance(parts, ListConfig) else parts
        raise ConfigError(
            f"model.adapters.parts must be a list drawn from {ADAPTABLE_PARTS} (the parts LoRA adapters exist for), "
            f"got {parts}: {unknown} cannot be adapted"
        )
    shared = [name for name in parts if name in trainable]
    if shared:
        raise ConfigError(
            f"{shared} is in both model.trainable and model.adapters.parts: a part is either fully trained or "
            "adapted (its base weights frozen)"
        )
    if not trainable and not parts:
        raise ConfigError("nothing trains: model.trainable and model.adapters.parts are both empty")
    for name in parts:
        part, key = adapters[name], f"model.adapters.{name}"
        if not isinstance(part.rank, int) or isinstance(part.rank, bool) or part.rank < 1:
            raise ConfigError(f"{key}.rank must be an integer >= 1, got {part.rank!r}")
        for setting in ("alpha", "learning_rate"):
            if not isinstance(part[setting], int | float) or isinstance(part[setting], bool) or part[setting] <= 0:
                raise ConfigError(f"{key}.{setting} must be a number > 0, got {part[setting]!r}")
        if not isinstance(part.dropout, int | float) or not 0.0 <= part.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {part.dropout!r}")
        targets = part.target_modules
        if targets is not None and (
            not isinstance(targets, ListConfig) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ConfigError(
                f"{key}.target_modules must be null (the part's attention projections) or a non-empty list of "
                f"module names, got {targets}"
            )


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge default ← files ← ``key=value`` overrides, rejecting unknown keys; interpolations are resolved."""
    cfg = OmegaConf.load(DEFAULT_CONFIG)
    for name in files:
        path = _resolve_config_file(name)
        file_cfg = OmegaConf.load(path)
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, not a list")
        _migrate_renamed_keys(file_cfg)
        _check_known_keys(file_cfg, cfg, source=str(path))
        cfg = OmegaConf.merge(cfg, file_cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. trainer.max_steps=100)")
    dotlist = OmegaConf.from_dotlist(list(overrides))
    _check_known_keys(dotlist, cfg, source="the command line")
    cfg = OmegaConf.merge(cfg, dotlist)
    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as error:
        raise ConfigError(str(error)) from error
    _validate_values(cfg)
    return cfg
