"""Train (and cache) the domain finding classifier behind the `domain` FID features and classifier agreement.

    python -m metrics.train_classifier                                   # the embedded synthetic set
    python -m metrics.train_classifier data.root=/data/mimic-cxr-jpg/2.1.0 fidelity.domain_classifier.steps=3000
    python -m metrics.train_classifier --retrain                         # replace the cached one

Same configuration as train.py (default.yaml <- --config files <- key=value overrides). The classifier trains on
``data.splits.train`` and is measured on ``data.splits.val``; it is cached under ``data.cache_dir`` by dataset
fingerprint and recipe, and trained lazily by FIDCallback and `evaluate.py fidelity` when missing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from configs import load_config
from datamodules.cxr_datamodule import resolve_data_root
from metrics.domain_classifier import INFO_FILE, ensure_domain_classifier, train_and_cache_domain_classifier


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="a YAML file merged over the defaults")
    parser.add_argument("--retrain", action="store_true", help="train again even when a cached classifier exists")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fidelity.domain_classifier.steps=400")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    root = resolve_data_root(cfg.data)
    folder = train_and_cache_domain_classifier(cfg, root) if args.retrain else ensure_domain_classifier(cfg, root)
    info = json.loads((folder / INFO_FILE).read_text())
    aurocs = ", ".join(f"{finding} {value:.3f}" for finding, value in info["held_out_auroc"].items())
    print(
        f"[domain classifier] {folder}\n  trained on {info['training_images']} images in {info['training_seconds']} s; "
        f"held-out ({info['held_out_split']}, {info['held_out_images']} images) AUROC: {aurocs}"
    )
    return info


if __name__ == "__main__":
    main()
