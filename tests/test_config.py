from pathlib import Path

import pytest
from omegaconf import OmegaConf

from configs import CONFIG_DIR, ConfigError, load_config


def test_defaults_load_with_every_section():
    cfg = load_config()
    for section in ("model", "data", "train", "trainer", "logger", "callbacks", "seed", "run_dir"):
        assert section in cfg
    assert cfg.model.trainable == ["unet"]
    assert cfg.train.ucg_probability == 0.3
    assert cfg.run_dir == "runs/frozen_text_encoder"  # interpolation of ${name} resolved


def test_dotlist_overrides_win_over_files_and_defaults(tmp_path: Path):
    override_file = tmp_path / "mine.yaml"
    override_file.write_text("trainer:\n  max_steps: 7\ndata:\n  batch_size: 3\n")
    cfg = load_config([override_file], ["trainer.max_steps=11", "model.trainable=[unet,vae]"])
    assert cfg.trainer.max_steps == 11
    assert cfg.data.batch_size == 3
    assert list(cfg.model.trainable) == ["unet", "vae"]


@pytest.mark.parametrize(
    ("override", "named", "suggested"),
    [
        ("model.trainble=[unet]", "model.trainble", "model.trainable"),
        ("trainer.max_step=5", "trainer.max_step", "trainer.max_steps"),
        ("data.synthetic.seeds=1", "data.synthetic.seeds", "data.synthetic.seed"),
    ],
)
def test_unknown_key_is_an_error_naming_it_and_the_closest_key(override, named, suggested):
    with pytest.raises(ConfigError) as error:
        load_config([], [override])
    assert f"'{named}'" in str(error.value)
    assert f"'{suggested}'" in str(error.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1.0\n")
    with pytest.raises(ConfigError, match="train.learning_rat.*bad.yaml"):
        load_config([bad])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.trainable=[unet,decoder]", "model.trainable"),
        ("train.ucg_probability=1.5", "ucg_probability"),
        ("stage=everything", "stage"),
        ("data.caption_section=summary", "caption_section"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_paper_presets_merge_and_differ_only_in_trainable_parts_and_name():
    frozen = load_config(["experiment/frozen_text_encoder"])
    learnable = load_config([CONFIG_DIR / "experiment" / "learnable_text_encoder.yaml"])
    assert list(frozen.model.trainable) == ["unet"]
    assert list(learnable.model.trainable) == ["unet", "text_encoder"]
    assert learnable.logger.wandb.group == "learnable_text_encoder"
    frozen_dict, learnable_dict = OmegaConf.to_container(frozen), OmegaConf.to_container(learnable)
    for config in (frozen_dict, learnable_dict):
        config["model"].pop("trainable")
        for key in ("name", "run_dir"):
            config.pop(key)
        config["logger"]["wandb"].pop("group")
    assert frozen_dict == learnable_dict


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_config(["experiment/no_such_preset"])


def test_real_data_presets_demand_their_paths_by_key():
    presets = ["experiment/stable_diffusion_2_base", "data/mimic_cxr"]
    with pytest.raises(ConfigError, match="model.pretrained must be set"):
        load_config(presets, ["data.root=/data/mimic"])
    with pytest.raises(ConfigError, match="data.root must be set"):
        load_config(presets, ["model.pretrained=/models/sd2"])
    cfg = load_config([*presets, "experiment/learnable_text_encoder"], ["model.pretrained=/m", "data.root=/d"])
    assert (cfg.model.pretrained, cfg.data.root, cfg.data.resolution) == ("/m", "/d", 512)
    assert cfg.model.text_encoder.pretrained is None and list(cfg.model.trainable) == ["unet", "text_encoder"]


def test_train_script_reports_a_config_typo_in_one_line_without_a_traceback(tmp_path: Path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "train.py"
    result = subprocess.run(
        [sys.executable, str(script), "model.trainble=[unet]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "config error: unknown config key 'model.trainble'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing is created before the config is valid


def test_a_run_config_written_before_a_key_was_renamed_still_loads(tmp_path):
    old_run_config = tmp_path / "config.yaml"
    old_run_config.write_text("fidelity:\n  extractor: inception\n  num_images: 50\n")
    cfg = load_config([old_run_config])
    assert list(cfg.fidelity.extractors) == ["inception"] and cfg.fidelity.num_images == 50
    assert "extractor" not in cfg.fidelity
    with pytest.raises(ConfigError, match="did you mean 'fidelity.extractors'"):
        load_config([], ["fidelity.extractor=domain"])  # the command line speaks the current schema
