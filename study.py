"""The paper's trade-off in one command: fidelity vs grounding for each way of fine-tuning.

    python study.py                                   # frozen vs learnable text encoder, embedded default (CPU)
    python study.py --presets experiment/frozen_text_encoder experiment/learnable_text_encoder \\
        --out studies/sd2-mimic --num-images 5000 \\
        --config experiment/stable_diffusion_2_base --config data/mimic_cxr --config trainer/ddp \\
        model.pretrained=/models/sd2-base data.root=/data/mimic-cxr-jpg data.ms_cxr_csv=/data/MS_CXR_v1.1.0.csv

Every preset is trained with the same data, steps, seeds and shared --config files / key=value overrides, then its
final checkpoint is evaluated with the same budget: `evaluate.py grounding` (the paper's protocol on the MS-CXR
split) and `evaluate.py fidelity` (M images). The in-training evaluations of each run give a curve as well. Results:
<out>/study.md, <out>/study.csv and <out>/tradeoff.png. A preset whose result.json exists is skipped, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import pandas as pd

import evaluate
import train

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_PRESETS = ("experiment/frozen_text_encoder", "experiment/learnable_text_encoder")
GROUNDING_COLUMNS = ("iou", "miou", "auc", "cnr", "pointing")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="experiment presets to compare")
    parser.add_argument("--config", action="append", default=[], help="a YAML file applied to every preset")
    parser.add_argument("--out", type=Path, default=Path("studies/tradeoff"), help="the study's folder")
    parser.add_argument("--num-images", type=int, default=100, help="M for FID and classifier agreement")
    parser.add_argument("--grounding-limit", type=int, default=None, help="at most this many MS-CXR pairs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every preset")
    return parser.parse_args(argv)


def run_preset(preset: str, args: argparse.Namespace) -> dict:
    """Train one preset and evaluate its final checkpoint; the result is written to <out>/<preset>/result.json."""
    name = Path(preset).name
    folder = args.out / name
    result_file = folder / "result.json"
    if result_file.is_file():
        print(f"[study] {name}: done before, skipped ({result_file})")
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    configs = [item for config in [*args.config, preset] for item in ("--config", config)]
    outputs = train.main([*configs, *args.overrides, f"run_dir={args.out / 'runs' / name}"])
    checkpoint = str(outputs["checkpoint"])
    grounding_args = ["grounding", "--model", checkpoint, "--out", str(folder / "grounding")]
    if args.grounding_limit:
        grounding_args += ["--limit", str(args.grounding_limit)]
    evaluate.main(grounding_args)
    evaluate.main(
        ["fidelity", "--model", checkpoint, "--out", str(folder / "fidelity"), "--num-images", str(args.num_images)]
    )
    grounding = json.loads((folder / "grounding" / "summary.json").read_text())
    fidelity = json.loads((folder / "fidelity" / "fidelity.json").read_text())["metrics"]
    result = {
        "preset": name,
        "checkpoint": checkpoint,
        "metrics_csv": str(outputs["metrics"]),
        "seconds": round(time.perf_counter() - started, 1),
        "grounding": grounding["overall"],
        "grounding_per_category": grounding["per_category"],
        "fidelity": fidelity,
    }
    folder.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result


def results_table(results: list[dict]) -> pd.DataFrame:
    """One row per preset: grounding (overall and per category), fidelity, wall time."""
    rows = []
    for result in results:
        row = {"preset": result["preset"], **{f"grounding/{k}": v for k, v in result["grounding"].items()}}
        for category, values in result["grounding_per_category"].items():
            row |= {f"grounding/{k}/{category}": v for k, v in values.items() if k != "count"}
        rows.append(row | result["fidelity"] | {"seconds": result["seconds"]})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    fid_columns = [c for c in table.columns if c.startswith("fid/")]
    columns = [
        "preset",
        *(f"grounding/{c}" for c in GROUNDING_COLUMNS),
        *fid_columns,
        "agreement/domain/auroc_mean",
        "seconds",
    ]
    columns = [c for c in columns if c in table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table[columns].iterrows():
        cells = [value if isinstance(value, str) else f"{value:.3f}" for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(results: list[dict], path: Path) -> None:
    """Grounding (AUC) against FID: each run's in-training evaluations as a curve, its final evaluation as a star."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for result in results:
        history = pd.read_csv(result["metrics_csv"])
        fid_column = next((c for c in history.columns if c.startswith("fid/")), None)
        if fid_column and "grounding/auc" in history.columns:
            curve = history.groupby("step")[[fid_column, "grounding/auc"]].max().dropna()
            line = axes.plot(
                curve[fid_column],
                curve["grounding/auc"],
                marker="o",
                alpha=0.5,
                label=f"{result['preset']} (in training, {fid_column})",
            )[0]
            color = line.get_color()
        else:
            color = None
        fid = next(v for k, v in result["fidelity"].items() if k.startswith("fid/"))
        axes.scatter(
            [fid], [result["grounding"]["auc"]], marker="*", s=200, color=color, label=f"{result['preset']} (final)"
        )
    axes.set_xlabel("FID (lower = closer to real images)")
    axes.set_ylabel("grounding AUC (higher = attention on the finding)")
    axes.set_title("Fidelity vs interpretability")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    started = time.perf_counter()
    results = [run_preset(preset, args) for preset in args.presets]
    table = results_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "study.csv", index=False)
    (args.out / "study.md").write_text(markdown(table))
    plot_tradeoff(results, args.out / "tradeoff.png")
    print(f"\n[study] {len(results)} presets in {time.perf_counter() - started:.0f} s\n")
    print(markdown(table))
    print(f"  table  {args.out / 'study.md'}\n  csv    {args.out / 'study.csv'}\n  plot   {args.out / 'tradeoff.png'}")
    return table


if __name__ == "__main__":
    main()
