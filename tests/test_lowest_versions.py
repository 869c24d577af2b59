"""The floors in pyproject.toml are the versions docs/configuration.md says the lowest-versions check passed on: a
floor moved without rerunning ``scripts/check_lowest_versions.sh`` (and updating that page) fails here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def floor_pins() -> dict[str, Version]:
    """What the check script installs, as it parses pyproject.toml."""
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_lowest_versions.sh"), "--pins"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {name.lower(): Version(version) for name, version in (line.split("==") for line in printed.split())}


def versions_the_docs_report() -> dict[str, Version]:
    section = (ROOT / "docs" / "configuration.md").read_text().split("## Lowest versions", 1)[1]
    passed = " ".join(re.search(r"Passed on\s(.*?)\(\d+ tests\)", section, re.DOTALL)[1].split())
    pairs = re.findall(r"([A-Za-z][\w.-]*) (\d[\w.]*)(?:,|$|\s)", passed.split(": ", 1)[1].strip())
    return {name.lower(): Version(version) for name, version in pairs}


def test_every_floor_is_the_version_the_check_passed_on():
    pins = floor_pins()
    assert list(pins)[0] == "torch" and len(pins) > 20  # torch installed first, every runtime dependency pinned
    assert versions_the_docs_report() == pins
