"""The README and docs/ pages a clone carries: their relative links and the section names code cites must exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists() or (anchor and anchor not in heading_anchors(destination)):
                broken.append(f"{page.name}: {target}")
    assert len(PAGES) > 3 and not broken, broken


def test_sections_cited_in_code_exist():
    """A docstring citing 'docs/method.md, "Localization metrics"' points at a heading of that page."""
    cited = set()
    for source in [*REPO.glob("*.py"), *REPO.glob("*/**/*.py"), *REPO.glob("configs/**/*.yaml")]:
        if ".venv" in source.parts:
            continue
        cited |= set(re.findall(r"docs/(\w+\.md),\s+\"([^\"]+)\"", source.read_text()))
    assert cited, "no citation found: the pattern no longer matches how code cites docs"
    missing = [
        f"docs/{page}: {section}"
        for page, section in cited
        if not re.search(rf"^#+\s+{re.escape(section)}\s*$", (REPO / "docs" / page).read_text(), re.M)
    ]
    assert not missing, missing


def test_nothing_cites_files_outside_the_repository():
    offenders = [
        str(path.relative_to(REPO))
        for path in [*REPO.glob("*.py"), *REPO.glob("*/**/*.py"), *REPO.glob("*/**/*.yaml"), *PAGES]
        if ".venv" not in path.parts
        and path != Path(__file__).resolve()
        and re.search(r"\.\./shared/|/work/shared", path.read_text())
    ]
    assert not offenders, offenders
