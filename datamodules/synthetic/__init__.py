"""Embedded synthetic chest X-ray dataset, written exactly in the MIMIC-CXR-JPG + reports + MS-CXR layout.

Why: tests, demos and CPU smoke runs need images, reports and grounding boxes without credentialed
PhysioNet access. The files have exactly the layout, columns and value conventions of the distributed
datasets, so the one real-data reader (datamodules.mimic, datamodules.mscxr) reads them unchanged.

Each study gets one frontal radiograph (PA or AP) drawn from vectorised coordinate grids (body outline,
air-filled lungs, heart and mediastinum, ribs, clavicles, spine, diaphragm domes), 0-2 findings from the
8 MS-CXR categories drawn at an anatomically plausible place with their true bounding boxes, a MIMIC-style
report naming them, a CheXpert row and MS-CXR rows. About 10% of studies also get a lateral image so a view
filter has something to drop. Same (n, resolution, seed) gives identical bytes for every file.

One module per concern: studies (ids, subjects, splits, views), anatomy (the normal chest), findings (the eight
categories, drawn), radiographs (whole frontal and lateral images), report_writing (report text and CheXpert
labels), layout (the files on disk and the cached copy), cli (the command below).

    python -m datamodules.synthetic --out /tmp/synthetic --n 1000 --resolution 256 --seed 0
"""

from __future__ import annotations

from datamodules.synthetic.cli import main
from datamodules.synthetic.layout import MS_CXR_FILE, ensure_synthetic_dataset, generate_synthetic_dataset

__all__ = ["MS_CXR_FILE", "ensure_synthetic_dataset", "generate_synthetic_dataset", "main"]
