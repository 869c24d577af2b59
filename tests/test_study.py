"""study.py on two presets for a few steps: table, CSV and plot, and a second invocation that skips finished runs."""

import pandas as pd

import study


def test_study_compares_presets_and_resumes_by_skipping_finished_ones(tiny_overrides, tmp_path, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("run_dir")]
    args = [
        "--out",
        str(tmp_path / "study"),
        "--num-images",
        "3",
        "--grounding-limit",
        "4",
        *overrides,
        "trainer.max_steps=2",
    ]
    table = study.main(args)
    assert list(table["preset"]) == ["frozen_text_encoder", "learnable_text_encoder"]
    for column in ("grounding/iou", "grounding/auc", "grounding/cnr", "grounding/pointing", "fid/domain@3"):
        assert table[column].notna().all(), column
    out = tmp_path / "study"
    written = pd.read_csv(out / "study.csv")
    assert list(written["preset"]) == list(table["preset"])
    assert "| frozen_text_encoder |" in (out / "study.md").read_text()
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    again = study.main(args)
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 2
    assert len(list((out / "runs" / "frozen_text_encoder").iterdir())) == 1  # no second training run
    pd.testing.assert_frame_equal(again, table)
