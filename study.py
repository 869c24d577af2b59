"""The paper's trade-off in one command: fidelity vs grounding for each way of fine-tuning, over several seeds.

    python study.py                                   # frozen, LoRA and learnable text encoder, 3 seeds (CPU)
    python study.py --seeds 5 trainer.max_steps=1200  # seeds 42..46 (from the config's seed), longer runs
    python study.py --config experiment/pixart_tiny \\
        --presets experiment/pixart_frozen_text_encoder experiment/pixart_learnable_text_encoder  # PixArt backbone
    python study.py --presets experiment/frozen_text_encoder experiment/learnable_text_encoder \\
        --seed-list 0 1 2 --out studies/sd2-mimic --num-images 5000 \\
        --config experiment/stable_diffusion_2_base --config data/mimic_cxr --config trainer/ddp \\
        model.pretrained=/models/sd2-base data.root=/data/mimic-cxr-jpg data.ms_cxr_csv=/data/MS_CXR_v1.1.0.csv

Every preset is trained once per seed (the config's ``seed``: training draws, the autoencoder stage's VAE and the
evaluations' noise) with the same data, steps and shared --config files / key=value overrides, then its final
checkpoint is evaluated with the same budget: `evaluate.py grounding` (the paper's protocol on the MS-CXR split)
and `evaluate.py fidelity` (M images). The in-training evaluations of each run give a trajectory as well.

Results: <out>/study.md (mean ± 95 % interval per preset and metric; each preset against the first, the baseline,
paired by seed), <out>/study.csv (one row per preset and seed), <out>/study_summary.csv and .json (the statistics)
and <out>/tradeoff.png. A (preset, seed) whose <out>/<preset>/seed<seed>/result.json exists is skipped, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import os

import configs.process_defaults  # noqa: F401  (on import, before torch loads: OpenMP waiting, known noise)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from itertools import cycle
from pathlib import Path

import matplotlib
import pandas as pd

import evaluate
import train
from callbacks.tradeoff_panel import fid_key, grounding_auc_key
from configs import ConfigError, load_config
from metrics.seed_statistics import CONFIDENCE, paired_difference, summarize

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DEFAULT_PRESETS = (
    "experiment/frozen_text_encoder",
    "experiment/lora_text_encoder",
    "experiment/learnable_text_encoder",
)
DEFAULT_SEEDS = 3
GROUNDING_METRICS = ("iou", "miou", "auc", "cnr", "pointing")
SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
# The trade-off's grounding AUC (plot's y axis) is callbacks.tradeoff_panel.GROUNDING_AUC_KEYS, shared with the
# live W&B panel: the first of its keys present in a run's history (or the final evaluation's row) is used.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets", nargs="+", default=list(DEFAULT_PRESETS), help="experiment presets; the first is the baseline"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="N seeds: the config's seed, seed+1, ...")
    seeds.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead of --seeds")
    parser.add_argument("--config", action="append", default=[], help="a YAML file applied to every preset")
    parser.add_argument("--out", type=Path, default=Path("studies/tradeoff"), help="the study's folder")
    parser.add_argument("--num-images", type=int, default=100, help="M for FID and classifier agreement")
    parser.add_argument("--grounding-limit", type=int, default=None, help="at most this many MS-CXR pairs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every preset")
    args = parser.parse_args(argv)
    if args.seed_list is None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def study_seeds(args: argparse.Namespace) -> list[int]:
    """--seed-list, or --seeds consecutive seeds from the seed the shared configs and overrides give."""
    if args.seed_list is not None:
        return list(dict.fromkeys(args.seed_list))
    first = load_config(args.config, args.overrides).seed
    return list(range(first, first + args.seeds))


def run_one(preset: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one preset with one seed and evaluate its final checkpoint; written to <out>/<preset>/seed<seed>/."""
    name = Path(preset).name
    folder = args.out / name / f"seed{seed}"
    result_file = folder / "result.json"
    if result_file.is_file():
        print(f"[study] {name} seed {seed}: done before, skipped ({result_file})")
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    configs = [item for config in [*args.config, preset] for item in ("--config", config)]
    run_dir = args.out / "runs" / name / f"seed{seed}"
    outputs = train.main([*configs, *args.overrides, f"seed={seed}", f"run_dir={run_dir}"])
    checkpoint = str(outputs["checkpoint"])
    grounding_args = ["grounding", "--model", checkpoint, "--out", str(folder / "grounding")]
    if args.grounding_limit:
        grounding_args += ["--limit", str(args.grounding_limit)]
    evaluate.main(grounding_args)
    evaluate.main(
        ["fidelity", "--model", checkpoint, "--out", str(folder / "fidelity"), "--num-images", str(args.num_images)]
    )
    grounding = json.loads((folder / "grounding" / "summary.json").read_text())
    fidelity_summary = json.loads((folder / "fidelity" / "fidelity.json").read_text())
    floor = {  # beside fid/<extractor>@M: what this run's VAE alone costs (one VAE per seed in the embedded study)
        f"fid/{name}_autoencoder_floor@{fidelity_summary['num_images']}": value
        for name, value in fidelity_summary["autoencoder_floor_fid"].items()
    }
    fidelity = fidelity_summary["metrics"] | floor
    result = {
        "preset": name,
        "seed": seed,
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


def flatten(prefix: str, values: Mapping) -> dict[str, float]:
    """Nested mappings as one level of ``prefix/key/...`` names (a grounding summary per metric convention)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= flatten(f"{prefix}/{key}", value)
        else:
            flat[f"{prefix}/{key}"] = value
    return flat


def results_table(results: list[dict]) -> pd.DataFrame:
    """One row per preset and seed: grounding (overall and per category), fidelity, wall time."""
    rows = []
    for result in results:
        row = {"preset": result["preset"], "seed": result["seed"], **flatten("grounding", result["grounding"])}
        for category, values in result["grounding_per_category"].items():
            row |= {f"{name}/{category}": v for name, v in flatten("grounding", values).items() if "count" not in name}
        rows.append(row | result["fidelity"] | {"seconds": result["seconds"]})
    return pd.DataFrame(rows)


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Every numeric metric of the per-seed table (what the statistics are computed for)."""
    return [c for c in table.columns if c not in ("preset", "seed") and pd.api.types.is_numeric_dtype(table[c])]


def headline_columns(columns: Sequence[str]) -> list[str]:
    """The metrics study.md shows: overall grounding (``grounding/<metric>`` or ``grounding/<convention>/<metric>``,
    not per category), FID, mean classifier agreement, diversity and wall time."""

    def overall_grounding(column: str) -> bool:
        parts = column.split("/")
        if parts[0] != "grounding" or parts[-1] not in GROUNDING_METRICS:
            return False
        return len(parts) == 2 or (len(parts) == 3 and parts[1] not in GROUNDING_METRICS)

    grounding = list(filter(overall_grounding, columns))
    conventions = list(dict.fromkeys(c.split("/")[1] if c.count("/") == 2 else "" for c in grounding))

    def convention_then_metric(column: str) -> tuple[int, int]:
        parts = column.split("/")
        return conventions.index(parts[1] if len(parts) == 3 else ""), GROUNDING_METRICS.index(parts[-1])

    grounding.sort(key=convention_then_metric)
    others = [c for c in columns if c.startswith(("fid/", "diversity/")) or c.endswith("/auroc_mean")]
    return [*grounding, *others, *(["seconds"] if "seconds" in columns else [])]


def seed_values(table: pd.DataFrame, preset: str, metric: str) -> dict[int, float]:
    rows = table[table["preset"] == preset]
    return {int(seed): float(value) for seed, value in zip(rows["seed"], rows[metric], strict=True)}


def statistics(table: pd.DataFrame) -> dict:
    """Per preset and metric the seed summary; per other preset and metric the paired difference to the first."""
    presets = list(dict.fromkeys(table["preset"]))
    metrics = metric_columns(table)
    summary = {p: {m: summarize(seed_values(table, p, m).values()) for m in metrics} for p in presets}
    baseline = presets[0]
    paired = {
        p: {m: paired_difference(seed_values(table, baseline, m), seed_values(table, p, m)) for m in metrics}
        for p in presets[1:]
    }
    return {"presets": presets, "baseline": baseline, "metrics": metrics, "summary": summary, "paired": paired}


def summary_table(stats: dict) -> pd.DataFrame:
    """study_summary.csv: one row per preset and metric (n, mean, sd, interval)."""
    return pd.DataFrame(
        {"preset": preset, "metric": metric, **value.as_dict()}
        for preset, metrics in stats["summary"].items()
        for metric, value in metrics.items()
    )


def summary_json(stats: dict, seeds: Sequence[int]) -> dict:
    return {
        "seeds": list(seeds),
        "confidence": CONFIDENCE,
        "baseline": stats["baseline"],
        "summary": {p: {m: s.as_dict() for m, s in ms.items()} for p, ms in stats["summary"].items()},
        "paired_vs_baseline": {p: {m: d.as_dict() for m, d in ms.items()} for p, ms in stats["paired"].items()},
    }


def interval_cell(mean: float, half_width: float, n: int, all_seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half_width):
        return f"{mean:.3f} (n={n}, no interval)"
    return f"{mean:.3f} ± {half_width:.3f}" + ("" if n == all_seeds else f" (n={n})")


def markdown(stats: dict, seeds: Sequence[int]) -> str:
    """Mean ± 95 % half-width per metric and preset, then each preset minus the baseline, paired by seed."""
    presets, columns = stats["presets"], headline_columns(stats["metrics"])
    percent = f"{CONFIDENCE:.0%}"
    lines = [
        f"Seeds {', '.join(map(str, seeds))} (n = {len(seeds)} per preset unless shown): mean ± half-width of the "
        f"{percent} Student-t interval of the mean (t with n - 1 degrees of freedom; one seed gives no interval).",
        "",
        "| metric | " + " | ".join(presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    for metric in columns:
        cells = [stats["summary"][p][metric] for p in presets]
        lines.append(
            f"| {metric} | " + " | ".join(interval_cell(s.mean, s.half_width, s.n, len(seeds)) for s in cells) + " |"
        )
    for preset, differences in stats["paired"].items():
        lines += [
            "",
            f"### {preset} − {stats['baseline']}, paired by seed",
            "",
            f"| metric | mean difference | {percent} interval | seeds | exceeds the spread |",
            "|---|---|---|---|---|",
        ]
        for metric in columns:
            d = differences[metric]
            interval = "n/a" if math.isnan(d.summary.half_width) else f"[{d.summary.low:.3f}, {d.summary.high:.3f}]"
            verdict = "yes" if d.exceeds_spread else ("no" if not math.isnan(d.summary.half_width) else "unknown")
            lines.append(f"| {metric} | {d.summary.mean:+.3f} | {interval} | {d.summary.n} | {verdict} |")
        beyond = [m for m in columns if differences[m].exceeds_spread]
        lines += ["", f"Beyond the spread (interval excludes 0): {', '.join(beyond) if beyond else 'none'}."]
    return "\n".join(lines) + "\n"


def training_trajectory(metrics_csv: str | Path) -> pd.DataFrame | None:
    """The run's in-training evaluations: (FID, grounding AUC) per step in step order, or None without both."""
    history = pd.read_csv(metrics_csv)
    fid, auc = fid_key(history.columns), grounding_auc_key(history.columns)
    if fid is None or auc is None:
        return None
    curve = history.groupby("step")[[fid, auc]].max().dropna().sort_index()
    return curve.set_axis(["fid", "auc"], axis=1)


def plot_tradeoff(results: list[dict], table: pd.DataFrame, path: Path) -> None:
    """Grounding AUC against FID: a colour per preset, a marker per seed; each run's in-training evaluations as a
    trajectory in step order, its final evaluation (evaluate.py's budget) as a large marker."""
    presets = list(dict.fromkeys(r["preset"] for r in results))
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    colors = dict(zip(presets, cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"]), strict=False))
    markers = dict(zip(seeds, cycle(SEED_MARKERS), strict=False))
    final_fid, final_auc = fid_key(table.columns), grounding_auc_key(table.columns)
    figure, axes = plt.subplots(figsize=(7, 5))
    for result, (_, row) in zip(results, table.iterrows(), strict=True):
        color, marker = colors[result["preset"]], markers[result["seed"]]
        curve = training_trajectory(result["metrics_csv"])
        if curve is not None:
            axes.plot(curve["fid"], curve["auc"], color=color, marker=marker, markersize=4, alpha=0.45, linewidth=1)
            first = curve.iloc[0]  # hollow: where the trajectory starts
            axes.plot(first["fid"], first["auc"], color=color, marker=marker, markersize=6, markerfacecolor="white")
        if final_fid and final_auc:
            axes.scatter(row[final_fid], row[final_auc], color=color, marker=marker, s=160, edgecolors="black")
    handles = [Line2D([], [], color=colors[p], linewidth=3, label=p) for p in presets]
    handles += [Line2D([], [], color="grey", marker=markers[s], linestyle="", label=f"seed {s}") for s in seeds]
    handles += [
        Line2D([], [], color="grey", marker="o", markersize=4, alpha=0.45, label="in training, step order"),
        Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="", label="first evaluation"),
        Line2D([], [], color="grey", marker="o", markersize=11, markeredgecolor="black", linestyle="", label="final"),
    ]
    axes.set_xlabel("FID (lower = closer to real images)")
    axes.set_ylabel("grounding AUC (higher = attention on the finding)")
    axes.set_title("Fidelity vs interpretability, every preset and seed")
    axes.legend(handles=handles, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """Run (or pick up) every preset and seed; write the tables, statistics and plot; return the per-seed table."""
    args = parse_args(argv)
    seeds = study_seeds(args)
    for preset in args.presets:  # a missing preset or bad key fails now, not after hours of the other runs
        load_config([*args.config, preset], args.overrides)
    started = time.perf_counter()
    # Seed by seed, so an interrupted study already holds whole seeds; reported preset by preset.
    runs = {(preset, seed): run_one(preset, seed, args) for seed in seeds for preset in args.presets}
    results = [runs[preset, seed] for preset in args.presets for seed in seeds]
    table = results_table(results)
    stats = statistics(table)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "study.csv", index=False)
    summary_table(stats).to_csv(out / "study_summary.csv", index=False)
    (out / "study_summary.json").write_text(json.dumps(summary_json(stats, seeds), indent=2))
    (out / "study.md").write_text(markdown(stats, seeds))
    plot_tradeoff(results, table, out / "tradeoff.png")
    print(f"\n[study] {len(args.presets)} presets x {len(seeds)} seeds in {time.perf_counter() - started:.0f} s\n")
    print(markdown(stats, seeds))
    for name in ("study.md", "study.csv", "study_summary.csv", "study_summary.json", "tradeoff.png"):
        print(f"  {out / name}")
    return table


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:  # a missing preset or a typo: one line, before any run starts
        raise SystemExit(f"config error: {error}") from None
