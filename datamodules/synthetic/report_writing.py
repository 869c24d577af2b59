"""Writing a MIMIC-style free-text report for a study, and the CheXpert labels it implies.

Why a module of its own: the report is what the text encoder reads and what MS-CXR's label_text quotes, so
its templates (impression phrases that name each category with one of the method's query words, findings
sentences, explicit negations and the CheXpert columns they set) and its layout (headers, ~78-character
lines with a leading space, finding phrases never split across lines) are kept together.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

import numpy as np

from datamodules.synthetic.findings import Finding
from datamodules.synthetic.studies import Study, pick

_SIZE = ("small", "moderate", "large")
_GRADE = ("mild", "moderate", "severe")
_LOBE = {
    ("right", "upper"): "right upper lobe",
    ("right", "middle"): "right middle lobe",
    ("right", "lower"): "right lower lobe",
    ("left", "upper"): "left upper lobe",
    ("left", "middle"): "lingula",
    ("left", "lower"): "left lower lobe",
}
_ZONE = {"upper": "upper lung", "middle": "mid lung", "lower": "lower lung"}
# Impression phrases (the MS-CXR label_text); each names its category with one of its query words
# (docs/method.md, "Attention capture for grounding").
_IMPRESSION_TEMPLATES = {
    "Atelectasis": (
        "{Side} basilar atelectasis",
        "Linear atelectasis at the {side} lung base",
        "Plate-like atelectasis in the {side} lower lobe",
        "Minimal {side} basal atelectasis",
    ),
    "Cardiomegaly": (
        "{Grade} cardiomegaly",
        "{Grade} enlargement of the cardiac silhouette",
        "The cardiac silhouette is {grade}ly enlarged",
    ),
    "Consolidation": (
        "{Lobe_adj} consolidation",
        "Focal consolidation in the {lobe}",
        "Dense consolidation in the {side} {zone}",
    ),
    "Edema": ("{Grade} pulmonary edema", "{Grade} perihilar edema", "{Grade} interstitial pulmonary edema"),
    "Lung Opacity": (
        "Hazy {side} {zone} opacity",
        "Ill-defined opacity in the {side} {zone}",
        "Patchy opacities in the {lobe}",
        "Faint opacification of the {side} {zone}",
    ),
    "Pleural Effusion": (
        "{Size} {side} pleural effusion",
        "{Side} pleural effusion, {size} in size",
        "{Size} {side} effusion with blunting of the costophrenic angle",
    ),
    "Pneumonia": (
        "{Lobe_adj} pneumonia",
        "Pneumonia in the {lobe}",
        "Findings concerning for {side} {zone} pneumonia",
    ),
    "Pneumothorax": (
        "{Size} {side} apical pneumothorax",
        "{Side} apical pneumothorax",
        "{Size} {side} pneumothorax at the apex",
    ),
}
_FINDINGS_TEMPLATES = {
    "Atelectasis": (
        "There is linear atelectasis at the {side} lung base.",
        "Streaky {side} basilar opacity is compatible with atelectasis.",
    ),
    "Cardiomegaly": ("The heart is {grade}ly enlarged.", "There is {grade} cardiomegaly."),
    "Consolidation": (
        "There is focal consolidation in the {lobe}.",
        "A dense consolidation is seen in the {side} {zone}.",
    ),
    "Edema": (
        "There is {grade} perihilar haziness consistent with pulmonary edema.",
        "Vascular congestion with {grade} interstitial edema.",
    ),
    "Lung Opacity": (
        "There is a hazy opacity in the {side} {zone}.",
        "Ill-defined opacities are seen in the {lobe}.",
    ),
    "Pleural Effusion": (
        "There is a {size} {side} pleural effusion.",
        "Blunting of the {side} costophrenic angle reflects a {size} effusion.",
    ),
    "Pneumonia": (
        "Patchy airspace disease in the {lobe} is concerning for pneumonia.",
        "Findings in the {side} {zone} are compatible with pneumonia.",
    ),
    "Pneumothorax": (
        "There is a {size} {side} apical pneumothorax.",
        "A {side} apical pleural line is seen with a {size} pneumothorax.",
    ),
}
# Explicit negations, and the CheXpert columns they set to 0.0.
_NEGATIONS = (
    ("No pleural effusion or pneumothorax.", ("Pleural Effusion", "Pneumothorax")),
    ("No pleural effusion.", ("Pleural Effusion",)),
    ("No pneumothorax.", ("Pneumothorax",)),
    ("No focal consolidation.", ("Consolidation",)),
    ("Heart size is normal.", ("Cardiomegaly",)),
    ("No pulmonary edema.", ("Edema",)),
    ("No evidence of pneumonia.", ("Pneumonia",)),
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute intrathoracic process.",
    "Normal chest radiograph.",
)
_INDICATIONS = (
    "___F with cough",
    "___M with shortness of breath",
    "___F with fever and productive cough",
    "___M with chest pain",
    "___-year-old woman with dyspnea",
    "___-year-old man, preoperative evaluation",
)
_REPORT_WIDTH = 78
_KEEP_TOGETHER = "\x00"  # stands in for spaces inside a finding phrase so wrapping never splits it


def _fill(template: str, finding: Finding) -> str:
    zone = finding.zone if finding.zone in _ZONE else "lower"
    words = {
        "side": finding.side,
        "zone": _ZONE[zone],
        "lobe": _LOBE.get((finding.side, zone), ""),
        "lobe_adj": "lingular" if (finding.side, zone) == ("left", "middle") else _LOBE.get((finding.side, zone)),
        "size": _SIZE[finding.severity],
        "grade": _GRADE[finding.severity],
    }
    words |= {key.capitalize(): str(value).capitalize() for key, value in words.items()}
    text = template.format(**words)
    return text[0].upper() + text[1:]


def _wrap(sentences: Iterable[str]) -> list[str]:
    """MIMIC-style lines: wrapped at ~78 characters with a leading space, finding phrases never split."""
    paragraph = "  ".join(sentences)
    lines = textwrap.wrap(paragraph, _REPORT_WIDTH, break_long_words=False, break_on_hyphens=False)
    return [" " + line.replace(_KEEP_TOGETHER, " ") for line in lines]


def write_report(
    rng: np.random.Generator, study: Study, findings: list[Finding]
) -> tuple[str, list[str], dict[str, float]]:
    """Report text, each finding's label phrase (as it appears in the report), and CheXpert labels."""
    frontal = study.images[0].view
    if frontal == "AP":
        technique = "AP portable upright view of the chest."
    elif len(study.images) > 1:
        technique = "PA and lateral views of the chest provided."
    else:
        technique = "Single frontal view of the chest provided."
    has_impression = rng.random() >= 0.1
    present = {finding.category for finding in findings}
    labels = {category: 1.0 for category in present}
    phrases = [_fill(pick(rng, _IMPRESSION_TEMPLATES[f.category]), f) for f in findings]
    kept = [phrase.replace(" ", _KEEP_TOGETHER) + "." for phrase in phrases]
    absent_negations = [(text, cols) for text, cols in _NEGATIONS if not present & set(cols)]
    chosen = rng.choice(len(absent_negations), size=min(len(absent_negations), 2), replace=False)
    negations = [absent_negations[int(i)] for i in sorted(chosen)]
    for _, columns in negations:
        labels |= {column: 0.0 for column in columns}
    if not findings:
        labels["No Finding"] = 1.0
        body = [technique, pick(rng, ("The lungs are clear.", "Lungs are clear bilaterally."))]
        body += [text for text, _ in negations] + ["The cardiomediastinal silhouette is within normal limits."]
        impression = [pick(rng, _NORMAL_IMPRESSIONS)]
    else:
        described = (
            kept if not has_impression else [_fill(pick(rng, _FINDINGS_TEMPLATES[f.category]), f) for f in findings]
        )
        body = [technique, *described, *(text for text, _ in negations)]
        impression = kept
    lines = [
        " " * 33 + "FINAL REPORT",
        f" EXAMINATION:  {study.procedure}",
        " ",
        f" INDICATION:  {pick(rng, _INDICATIONS)}",
        " ",
        " COMPARISON:  ___",
        " ",
        " FINDINGS:",
        " ",
        *_wrap(body),
    ]
    if has_impression:
        if len(impression) > 1 and rng.random() < 0.5:
            numbered = [f" {i}. {text.replace(_KEEP_TOGETHER, ' ')}" for i, text in enumerate(impression, 1)]
        else:
            numbered = _wrap(impression)
        lines += [" ", " IMPRESSION:", " ", *numbered]
    return "\n".join(lines) + "\n", phrases, labels
