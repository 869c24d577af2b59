"""The study plan of the synthetic set: subjects, study and DICOM ids, splits, views, dates.

Why a module of its own: every id and split comes from one layout generator before anything is drawn, so the
plan (which subject a study belongs to, which split it is in, whether it has a lateral) does not depend on how
images and reports are rendered, and changing a drawing never reshuffles the splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StudyImage:
    dicom_id: str
    view_position: str  # PA | AP | LATERAL | "" (a metadata row with an empty ViewPosition)
    view: str  # what was drawn: PA | AP | LATERAL


@dataclass(frozen=True)
class Study:
    subject_id: int
    study_id: int
    split: str
    images: tuple[StudyImage, ...]  # the frontal image first
    study_date: int
    study_time: float

    @property
    def procedure(self) -> str:
        """PerformedProcedureStepDescription, also the report's EXAMINATION line."""
        if self.images[0].view == "AP":
            return "CHEST (PORTABLE AP)"
        return "CHEST (PA AND LAT)" if len(self.images) > 1 else "CHEST (PA)"

    @property
    def folder(self) -> str:
        subject = str(self.subject_id)
        return f"files/p{subject[:2]}/p{subject}/s{self.study_id}"


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{part:08x}" for part in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def plan_studies(rng: np.random.Generator, n: int) -> list[Study]:
    """Subjects with 1-2 studies, an 80/10/10 split by subject (every split non-empty), ~10% laterals."""
    subject_of_study: list[int] = []
    for _ in range(n):
        second_study = n >= 10 and subject_of_study and rng.random() < 0.2
        if second_study and subject_of_study.count(subject_of_study[-1]) == 1:
            subject_of_study.append(subject_of_study[-1])
        else:
            subject_of_study.append(len(set(subject_of_study)))
    n_subjects = subject_of_study[-1] + 1
    subject_ids = 10_000_000 + rng.choice(10_000_000, size=n_subjects, replace=False)
    study_ids = 50_000_000 + rng.choice(10_000_000, size=n, replace=False)
    n_held_out = max(1, round(0.1 * n_subjects))
    order = rng.permutation(n_subjects)
    subject_split = {int(s): "train" for s in order[2 * n_held_out :]}
    subject_split |= {int(s): "validate" for s in order[:n_held_out]}
    subject_split |= {int(s): "test" for s in order[n_held_out : 2 * n_held_out]}
    lateral_studies = np.sort(rng.choice(n, size=max(1, round(0.1 * n)), replace=False))
    n_empty_view = 0 if len(lateral_studies) < 2 else 1 if len(lateral_studies) < 10 else 2
    empty_view_studies = set(lateral_studies[:n_empty_view].tolist())
    studies = []
    for index in range(n):
        has_lateral = index in lateral_studies
        frontal = "PA" if has_lateral or rng.random() < 0.6 else "AP"
        images = [StudyImage(_dicom_id(rng), frontal, frontal)]
        if has_lateral:
            lateral_position = "" if index in empty_view_studies else "LATERAL"
            images.append(StudyImage(_dicom_id(rng), lateral_position, "LATERAL"))
        year, month, day = rng.integers(2110, 2190), rng.integers(1, 13), rng.integers(1, 29)
        seconds = rng.uniform(0, 86_400)
        hhmmss = int(seconds // 3600) * 10_000 + int(seconds % 3600 // 60) * 100 + seconds % 60
        studies.append(
            Study(
                subject_id=int(subject_ids[subject_of_study[index]]),
                study_id=int(study_ids[index]),
                split=subject_split[subject_of_study[index]],
                images=tuple(images),
                study_date=int(year * 10_000 + month * 100 + day),
                study_time=round(float(hhmmss), 3),
            )
        )
    return studies
