"""study.py on two presets and two seeds for a few steps: per-seed table, statistics with known answers (t(0.975; 1)
= 12.706 from a printed table), trajectories, plot, and a second invocation that skips finished runs."""

import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

import study

PRESETS = ["experiment/frozen_text_encoder", "experiment/learnable_text_encoder"]


def test_study_over_two_seeds_reports_intervals_paired_differences_and_resumes(tiny_overrides, tmp_path, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("run_dir")]
    out = tmp_path / "study"
    args = [
        "--presets",
        *PRESETS,
        "--seeds",
        "2",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--grounding-limit",
        "4",
        *overrides,
        "trainer.max_steps=2",
        "callbacks.grounding.every_n_steps=1",  # two in-training evaluations: a trajectory per run
        "callbacks.grounding.num_items=4",
        "callbacks.fidelity.every_n_steps=1",
        "callbacks.attention_heatmaps.enabled=false",
        "callbacks.sample_grid.every_n_steps=0",
    ]
    table = study.main(args)
    names = ["frozen_text_encoder", "learnable_text_encoder"]
    assert list(zip(table["preset"], table["seed"], strict=True)) == [(p, s) for p in names for s in (42, 43)]
    for name in names:
        for seed in (42, 43):  # the seed reaches the run's config, one folder per seed
            (run,) = (out / "runs" / name / f"seed{seed}").iterdir()
            assert OmegaConf.load(run / "config.yaml").seed == seed
    auc = study.grounding_auc_key(table.columns)
    for column in (auc, "fid/domain@3", "agreement/domain/auroc_mean"):
        assert table[column].notna().all(), column
    frozen = table[table["preset"] == names[0]]
    assert frozen[auc].nunique() == 2  # another seed, another draw
    floor = table.pivot(index="seed", columns="preset", values="fid/domain_autoencoder_floor@3")
    assert (floor[names[0]] == floor[names[1]]).all() and (floor > 0).all().all()  # the seed's frozen VAE alone
    pd.testing.assert_frame_equal(pd.read_csv(out / "study.csv"), table, check_dtype=False)

    # Known answers from the per-seed values: mean, sd (n - 1), t half-width, paired difference per seed.
    stats = json.loads((out / "study_summary.json").read_text())
    assert stats["seeds"] == [42, 43] and stats["baseline"] == names[0]
    x1, x2 = frozen[auc]
    learnable = table[table["preset"] == names[1]]
    y1, y2 = learnable[auc]
    frozen_auc = stats["summary"][names[0]][auc]
    assert frozen_auc["n"] == 2 and frozen_auc["mean"] == pytest.approx((x1 + x2) / 2)
    assert frozen_auc["std"] == pytest.approx(abs(x1 - x2) / math.sqrt(2))
    assert frozen_auc["half_width"] == pytest.approx(12.706 * abs(x1 - x2) / 2, rel=1e-4)
    paired = stats["paired_vs_baseline"][names[1]][auc]
    assert paired["seeds"] == [42, 43] and paired["differences"] == pytest.approx([y1 - x1, y2 - x2])
    assert paired["mean"] == pytest.approx((y1 - x1 + y2 - x2) / 2)
    assert paired["half_width"] == pytest.approx(12.706 * abs((y1 - x1) - (y2 - x2)) / 2, rel=1e-4)
    assert paired["exceeds_spread"] == (abs(paired["mean"]) > paired["half_width"])
    summary_csv = pd.read_csv(out / "study_summary.csv")
    row = summary_csv[(summary_csv["preset"] == names[0]) & (summary_csv["metric"] == auc)].iloc[0]
    assert (row["n"], row["low"]) == (2, pytest.approx(frozen_auc["mean"] - frozen_auc["half_width"]))

    markdown = (out / "study.md").read_text()
    assert f"| {auc} | {frozen_auc['mean']:.3f} ± {frozen_auc['half_width']:.3f} |" in markdown
    assert f"### {names[1]} − {names[0]}, paired by seed" in markdown
    assert f"| {auc} | {paired['mean']:+.3f} | [{paired['low']:.3f}, {paired['high']:.3f}] | 2 |" in markdown

    result = json.loads((out / names[0] / "seed42" / "result.json").read_text())
    trajectory = study.training_trajectory(result["metrics_csv"])
    assert list(trajectory.index) == [1, 2] and trajectory.notna().all().all()
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    again = study.main(args)
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert len(list((out / "runs" / names[0] / "seed42").iterdir())) == 1  # no second training run
    pd.testing.assert_frame_equal(again, table)


def test_one_seed_has_means_but_says_it_has_no_interval():
    table = pd.DataFrame(
        {"preset": ["a", "b"], "seed": [7, 7], "grounding/auc": [0.6, 0.7], "fid/domain@100": [30.0, 20.0]}
    )
    stats = study.statistics(table)
    text = study.markdown(stats, [7])
    assert "| grounding/auc | 0.600 (n=1, no interval) | 0.700 (n=1, no interval) |" in text
    assert "| fid/domain@100 | -10.000 | n/a | 1 | unknown |" in text
    assert stats["paired"]["b"]["grounding/auc"].summary.mean == pytest.approx(0.1)


def test_seeds_follow_the_configured_seed_unless_listed():
    assert study.study_seeds(study.parse_args(["--seeds", "3", "seed=7"])) == [7, 8, 9]
    assert study.study_seeds(study.parse_args([])) == [42, 43, 44]
    assert study.study_seeds(study.parse_args(["--seed-list", "5", "1", "5"])) == [5, 1]
    assert study.DEFAULT_PRESETS[0] == "experiment/frozen_text_encoder"
