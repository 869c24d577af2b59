import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
import grounding.evaluation
from configs import load_config
from datamodules.mscxr import EXCLUDED_NO_QUERY_WORD, EXCLUDED_PHRASES_DIFFER, PAIR_SET_DESCRIPTIONS, read_ms_cxr
from grounding.evaluation import evaluate_grounding, heatmap_settings, interleave_categories
from grounding.phrase_grounding import HeatmapSettings
from lightning_modules.devices import evaluation_device
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.loading import load_diffusion_module
from metrics.grounding_metrics import PhraseGroundingMetrics
from tests.test_mscxr import REFERENCE_EXCLUDED, REFERENCE_PAIRS, REFERENCE_ROWS, write_reference_csv

TINY_MODEL_OVERRIDES = ["model.text_encoder.max_length=16", "model.text_encoder.use_attention_mask=false"]
FAST = ["grounding.num_inference_steps=3", "grounding.last_k_steps=2", "grounding.batch_size=2"]
METRICS = [
    *(f"paper_code/{name}" for name in ("iou", "miou", "auc", "cnr", "pointing")),
    *(f"biovil/{name}" for name in ("miou", "auc", "cnr")),
    *(f"method/{name}" for name in ("iou", "miou", "auc", "cnr", "pointing", "iou@0.3", "iou@0.5")),
]


def grounding_cli(model: Path, data_root: Path, out: Path, *extra: str, split: str = "train") -> dict:
    argv = ["grounding", "--model", str(model), "--data-root", str(data_root), "--split", split, "--out", str(out)]
    args = evaluate.build_parser().parse_args([*argv, *extra, *TINY_MODEL_OVERRIDES, *FAST])
    return args.run(args)


@pytest.fixture
def evaluated_pairs(monkeypatch) -> list[str]:
    """Phrases the evaluation computes heatmaps for (a spy around the real computation)."""
    phrases: list[str] = []
    real = grounding.evaluation.phrase_grounding_heatmaps

    def spy(module, pixel_values, batch_phrases, categories, settings, image_ids):
        phrases.extend(batch_phrases)
        return real(module, pixel_values, batch_phrases, categories, settings, image_ids)

    monkeypatch.setattr(grounding.evaluation, "phrase_grounding_heatmaps", spy)
    return phrases


def test_cli_writes_per_sample_rows_summary_and_heatmaps_and_resumes(
    tiny_model_dir, synthetic_root, tmp_path, evaluated_pairs
):
    out = tmp_path / "eval"
    items = interleave_categories(read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "train"))[:6]

    grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "4", "--heatmaps")
    assert len(evaluated_pairs) == 4
    summary = grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "6", "--heatmaps")
    assert len(evaluated_pairs) == 6  # the second run skipped the 4 finished rows

    rows = pd.read_csv(out / "per_sample.csv", dtype={"dicom_id": str})
    assert list(zip(rows["dicom_id"], rows["phrase"], strict=True)) == [(i.dicom_id, i.phrase) for i in items]
    assert list(rows.columns) == ["dicom_id", "category", "phrase", "num_boxes_dropped", *METRICS]
    assert all(rows[f"{convention}/auc"].between(0, 1).all() for convention in ("paper_code", "biovil", "method"))
    assert len(list((out / "heatmaps").glob("*.png"))) == 6

    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["count"] == 6
    category_means = rows.groupby("category")[METRICS].mean()
    for name in METRICS:
        assert written["overall"][name] == pytest.approx(rows[name].mean())
        assert written["macro"][name] == pytest.approx(category_means[name].mean())
    for category, values in written["per_category"].items():
        assert values["count"] == (rows["category"] == category).sum()
        assert values["paper_code/iou"] == pytest.approx(category_means.loc[category, "paper_code/iou"])
    caption, blank, *table = (out / "summary.md").read_text().splitlines()
    assert caption == f"Split `train`, pairs `phrase`: {PAIR_SET_DESCRIPTIONS['phrase']}." and blank == ""
    assert written["pairs"] == {
        "set": "phrase",
        "description": PAIR_SET_DESCRIPTIONS["phrase"],
        "excluded": {},
        "excluded_ids": {},
    }
    assert table[0] == "| convention | mean over | iou | miou | auc | cnr | pointing | iou@0.3 | iou@0.5 |"
    assert table[2].startswith("| paper_code | 6 pairs | ") and table[4].startswith("| biovil | 6 pairs | ")
    assert table[4].split(" | ")[2] == ""  # biovil has no GMM IoU: an empty cell, not a made-up value
    assert "method:" in table and len(table) == 2 + 6 + 3 * (6 + len(written["per_category"]))

    grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "6")
    assert len(evaluated_pairs) == 6  # nothing left to do
    assert len(pd.read_csv(out / "per_sample.csv")) == 6


def test_summary_means_match_the_torchmetrics_aggregation(tiny_model_dir, synthetic_root, tmp_path):
    summary = grounding_cli(tiny_model_dir, synthetic_root, tmp_path / "eval", "--limit", "5")
    module, cfg = load_diffusion_module(tiny_model_dir, [*TINY_MODEL_OVERRIDES, *FAST])
    metric = PhraseGroundingMetrics(seed=cfg.grounding.seed)
    items = interleave_categories(read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "train"), 5)
    evaluate_grounding(
        module, items, synthetic_root, 32, heatmap_settings(cfg.grounding), metric, cfg.grounding.batch_size
    )
    expected = metric.compute()
    assert summary["count"] == int(expected["count"])
    for name in METRICS:
        assert summary["overall"][name] == pytest.approx(float(expected[name]), abs=1e-6)
        for category, values in summary["per_category"].items():
            assert values[name] == pytest.approx(float(expected[f"{name}/{category}"]), abs=1e-6, nan_ok=True)


def test_resuming_with_other_settings_is_refused(tiny_model_dir, synthetic_root, tmp_path):
    out = tmp_path / "eval"
    grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "1")
    with pytest.raises(ValueError, match="heatmap_settings"):
        grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "1", "grounding.seed=7")


def test_reference_pairs_score_the_reference_rows_with_their_merged_boxes(
    tiny_model_dir, tmp_path, evaluated_pairs, monkeypatch
):
    data_root = tmp_path / "data"
    for row in REFERENCE_ROWS:
        image = data_root / row.split(",")[-7]  # the path column
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (200, 300), 128).save(image)
    ms_cxr = ["--ms-cxr", str(write_reference_csv(tmp_path))]
    samples = []
    real = grounding.evaluation.load_grounding_sample

    def spy(item, root, resolution):
        samples.append(real(item, root, resolution))
        return samples[-1]

    monkeypatch.setattr(grounding.evaluation, "load_grounding_sample", spy)
    out = tmp_path / "reference"
    summary = grounding_cli(tiny_model_dir, data_root, out, *ms_cxr, "--pairs", "reference", split="all")

    expected = [(dicom_id, category, phrase) for dicom_id, category, phrase, _ in REFERENCE_PAIRS]  # one a category
    rows = pd.read_csv(out / "per_sample.csv", dtype={"dicom_id": str})
    assert list(zip(rows["dicom_id"], rows["category"], rows["phrase"], strict=True)) == expected
    assert evaluated_pairs == [phrase for _, _, phrase in expected]  # the model read exactly these phrases
    # a / Pleural Effusion: its two boxes, 200 x 300 -> 32 x 48 (x 0.16), 8 rows cropped off the top, one mask.
    effusion = samples[0]
    assert (effusion["dicom_id"], effusion["category"]) == ("a", "Pleural Effusion")
    merged = torch.zeros(32, 32, dtype=torch.bool)
    merged[4:12, 4:12] = True  # (25, 75, 50, 50) -> (4, 4, 8, 8)
    merged[20:32, 20:28] = True  # (125, 175, 50, 75) -> (20, 20, 8, 12)
    assert torch.equal(effusion["mask"], merged) and effusion["num_boxes_dropped"] == 0

    counts = {reason: len(ids) for reason, ids in REFERENCE_EXCLUDED.items()}
    assert summary["count"] == 4 and summary["settings"]["pairs"] == "reference"
    assert summary["pairs"] == {
        "set": "reference",
        "description": PAIR_SET_DESCRIPTIONS["reference"],
        "excluded": counts,
        "excluded_ids": REFERENCE_EXCLUDED,
    }
    assert json.loads((out / "summary.json").read_text())["pairs"] == summary["pairs"]
    caption = (out / "summary.md").read_text().splitlines()[0]
    assert caption == (
        f"Split `all`, pairs `reference`: {PAIR_SET_DESCRIPTIONS['reference']}; 2 left out: {EXCLUDED_NO_QUERY_WORD}"
        f"; 1 left out: {EXCLUDED_PHRASES_DIFFER}."
    )
    with pytest.raises(ValueError, match="pairs differ"):  # the folder holds another pair set's rows
        grounding_cli(tiny_model_dir, data_root, out, *ms_cxr, split="all")

    phrase_summary = grounding_cli(tiny_model_dir, data_root, tmp_path / "phrase", *ms_cxr, split="all")
    assert phrase_summary["count"] == len(REFERENCE_ROWS) - 1  # the default: every (image, phrase), none left out
    assert phrase_summary["pairs"]["excluded"] == {}


def test_a_folder_written_before_the_pair_sets_resumes_as_phrase_pairs(tiny_model_dir, synthetic_root, tmp_path):
    out = tmp_path / "eval"
    grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "1")
    settings = json.loads((out / "settings.json").read_text())
    del settings["pairs"]
    (out / "settings.json").write_text(json.dumps(settings))
    assert grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "2")["count"] == 2
    with pytest.raises(ValueError, match="pairs differ"):
        grounding_cli(tiny_model_dir, synthetic_root, out, "--limit", "2", "--pairs", "reference")


def test_missing_ms_cxr_csv_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        grounding_cli(tiny_model_dir, tmp_path, tmp_path / "eval", "--ms-cxr", str(tmp_path / "nowhere.csv"))


def test_evaluation_uses_ema_weights_in_eval_mode_and_restores_the_training_state(
    tiny_overrides, synthetic_root, monkeypatch
):
    module = LatentDiffusionModule.from_config(load_config([], [*tiny_overrides, "train.use_ema=true"])).train()
    with torch.no_grad():
        module.unet.conv_in.weight.add_(1.0)  # training moved away from the EMA average
    training_weight = module.unet.conv_in.weight.detach().clone()
    ema_unet = module.evaluation_parts().denoiser
    assert ema_unet is not module.unet and not torch.equal(ema_unet.conv_in.weight, training_weight)
    calls = {"ema": 0, "training": 0}
    ema_unet.register_forward_pre_hook(lambda *_: calls.update(ema=calls["ema"] + 1))
    module.unet.register_forward_pre_hook(lambda *_: calls.update(training=calls["training"] + 1))
    seen = {}
    real = grounding.evaluation.phrase_grounding_heatmaps

    def spy(module, *args, **kwargs):
        seen.update(weight=module.unet.conv_in.weight.detach().clone(), training=module.training)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(grounding.evaluation, "phrase_grounding_heatmaps", spy)
    items = read_ms_cxr(synthetic_root / "MS_CXR_Local_Alignment_v1.1.0.csv", "test")[:1]
    evaluate_grounding(module, items, synthetic_root, 32, HeatmapSettings(3, 2), PhraseGroundingMetrics(), 1)
    assert calls == {"ema": 2, "training": 0}  # K = 2 UNet calls, all on the EMA copy
    assert torch.equal(seen["weight"], training_weight) and not seen["training"]  # never swapped, even meanwhile
    assert torch.equal(module.unet.conv_in.weight, training_weight) and module.training and module.unet.training


# ------------------------------------------------------------------------------------------------ --device
def test_device_defaults_to_cuda_when_available_and_explicit_cpu_is_honoured(
    tiny_model_dir, synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device(None) == torch.device("cuda")
    for subcommand in ("grounding", "fidelity"):  # one shared --device, parsed the same way by both
        args = evaluate.build_parser().parse_args([subcommand, "--model", "m", "--out", "o"])
        assert args.device == torch.device("cuda")
    seen = []
    real = grounding.evaluation.phrase_grounding_heatmaps

    def spy(module, pixel_values, *args, **kwargs):
        seen.append((module.device, next(module.unet.parameters()).device))
        return real(module, pixel_values, *args, **kwargs)

    monkeypatch.setattr(grounding.evaluation, "phrase_grounding_heatmaps", spy)
    summary = grounding_cli(tiny_model_dir, synthetic_root, tmp_path / "eval", "--limit", "2", "--device", "cpu")
    assert seen and set(seen) == {(torch.device("cpu"), torch.device("cpu"))}
    assert summary["device"] == "cpu"


@pytest.mark.parametrize("subcommand", ["grounding", "fidelity"])
@pytest.mark.parametrize(
    ("device", "message"),
    [("banana", "--device 'banana' is not a torch device"), ("cuda:7", "--device 'cuda:7' cannot be used")],
)
def test_an_unusable_device_is_a_parser_error_naming_it(subcommand, device, message, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    with pytest.raises(SystemExit) as stop:
        evaluate.build_parser().parse_args([subcommand, "--model", "m", "--out", "o", "--device", device])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        evaluation_device(device)
