"""Captions from MIMIC-CXR free-text reports: section parsing, caption choice, and token-budget truncation.

The paper conditions on the report's impression; reports without one fall back to the findings, and
reports with neither to their last free paragraph. Captions are whitespace-normalised and must fit the
text encoder's context (77 tokens for CLIP), so `truncate_to_tokens` cuts them and says when it did.
"""

from __future__ import annotations

import re
from typing import Literal

from transformers import PreTrainedTokenizerBase

from datamodules.skips import SKIP_UNDECODABLE_REPORT

CaptionSection = Literal["impression", "findings", "both"]
PREAMBLE = "PREAMBLE"

# An upper-case header ("IMPRESSION", "WET READ", "RECOMMENDATION(S)") then a colon, at line start.
_SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z()/&-]*(?:[ \t]+[A-Z()/&-]+)*)[ \t]*:(.*)$")
# A title line without a colon, e.g. "FINAL REPORT": not report content.
_TITLE_LINE = re.compile(r"^[ \t]*[A-Z]+(?:[ \t]+[A-Z]+)*[ \t]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class ReportDecodeError(ValueError):
    """A report file that cannot be used as text; ``reason`` is a ``datamodules.skips`` reason."""

    def __init__(self, source: object, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {reason} ({detail})")
        self.source, self.reason = source, reason


def decode_report(data: bytes, source: str) -> str:
    """A report file's text: strict UTF-8 (a leading byte-order mark is dropped), never a guess.

    MIMIC-CXR reports are UTF-8 (in practice ASCII). Anything else (Latin-1 accents, UTF-16, random bytes) would
    train as garbled text, so it raises ReportDecodeError and the study is skipped and counted; so is text with
    NUL characters, which is what BOM-less UTF-16 looks like when it happens to decode as UTF-8.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ReportDecodeError(source, SKIP_UNDECODABLE_REPORT, str(error)) from error
    if "\x00" in text:
        raise ReportDecodeError(source, SKIP_UNDECODABLE_REPORT, f"NUL character at offset {text.index(chr(0))}")
    return text


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs) to one space and strip the ends."""
    return " ".join(text.split())


def parse_report_sections(text: str) -> dict[str, str]:
    """Split a report into {HEADER: section text}, in report order.

    A header is upper-case words followed by a colon at the start of a line (after optional spaces); text
    after the colon on the same line belongs to the section. Keys are the headers with single spaces.
    Non-blank text before the first header is kept under "PREAMBLE". A repeated header's texts are joined
    by a newline. Section texts keep their line breaks and are stripped.
    """
    sections: dict[str, list[str]] = {PREAMBLE: []}
    current = PREAMBLE
    for line in text.splitlines():
        header = _SECTION_HEADER.match(line)
        if header:
            current = normalize_whitespace(header.group(1))
            sections.setdefault(current, [])
            line = header.group(2)
        sections[current].append(line)
    parsed = {key: "\n".join(lines).strip() for key, lines in sections.items()}
    if not parsed[PREAMBLE]:
        del parsed[PREAMBLE]
    return parsed


def _free_paragraph(text: str) -> str:
    """The last non-empty paragraph whose first content line is not a section header (titles ignored)."""
    for paragraph in reversed(_PARAGRAPH_BREAK.split(text.replace("\r\n", "\n"))):
        lines = [line for line in paragraph.split("\n") if line.strip() and not _TITLE_LINE.match(line)]
        if lines and not _SECTION_HEADER.match(lines[0]):
            return "\n".join(lines)
    return ""


def caption_from_report(text: str, section: CaptionSection = "impression") -> str:
    """The caption a report gives: IMPRESSION, FINDINGS or both, whitespace-normalised.

    "impression" falls back to FINDINGS, "findings" to IMPRESSION, and both of them (and "both", which
    joins FINDINGS then IMPRESSION) to the report's free paragraph when neither section has text.
    De-identified spans ("___") are kept. An empty string means the report gave no caption.
    """
    sections = parse_report_sections(text)
    findings = sections.get("FINDINGS", "")
    impression = sections.get("IMPRESSION", "")
    if section == "impression":
        chosen = impression or findings
    elif section == "findings":
        chosen = findings or impression
    elif section == "both":
        chosen = f"{findings} {impression}"
    else:
        raise ValueError(f"caption section must be 'impression', 'findings' or 'both', got {section!r}")
    return normalize_whitespace(chosen) or normalize_whitespace(_free_paragraph(text))


def truncate_to_tokens(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[str, bool]:
    """Cut `text` so that it encodes to at most `max_length` tokens INCLUDING the special tokens.

    The cut falls at the character end of the last content token that fits (found with the fast
    tokenizer's offset mapping, so WordPiece and BPE both work). Returns (text, was_truncated).
    """
    if not tokenizer.is_fast:
        raise TypeError(f"truncate_to_tokens needs a fast tokenizer (offset mapping), got {type(tokenizer)}")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text beside the special tokens")
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    if len(encoding["input_ids"]) <= max_length:
        return text, False
    content_ends = [
        end
        for (_, end), special in zip(encoding["offset_mapping"], encoding["special_tokens_mask"], strict=True)
        if not special
    ]
    # A cut inside a word can re-tokenise differently; step back until the prefix really fits.
    for keep in range(budget, 0, -1):
        truncated = text[: content_ends[keep - 1]].rstrip()
        if len(tokenizer(truncated, add_special_tokens=True)["input_ids"]) <= max_length:
            return truncated, True
    return "", True
