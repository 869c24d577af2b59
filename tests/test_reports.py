"""Report sections, caption choice with fallbacks, and token-budget truncation (WordPiece and BPE)."""

import pytest

from datamodules.reports import caption_from_report, parse_report_sections, truncate_to_tokens
from tests.conftest import build_byte_level_bpe

MIMIC_STYLE_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  ___

 FINDINGS:

 PA and lateral views of the chest provided.  There is no focal consolidation,
 effusion, or pneumothorax.

 IMPRESSION:

 No acute intrathoracic process.
"""

FINDINGS_ONLY_REPORT = """ WET READ: ___ ___ 4:20 PM
 FINDINGS:\tHeart size is normal.
 \tLungs are   clear.
"""


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return build_byte_level_bpe(["there is a small left pleural effusion with adjacent atelectasis"] * 5)


def test_sections_are_split_at_upper_case_headers():
    sections = parse_report_sections(MIMIC_STYLE_REPORT)
    assert list(sections) == ["PREAMBLE", "EXAMINATION", "INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"]
    assert sections["PREAMBLE"] == "FINAL REPORT"
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["COMPARISON"] == "___"
    assert sections["FINDINGS"].startswith("PA and lateral views") and sections["FINDINGS"].endswith("pneumothorax.")


def test_header_with_spaces_keeps_the_text_after_its_colon():
    sections = parse_report_sections(FINDINGS_ONLY_REPORT)
    assert "PREAMBLE" not in sections
    assert sections["WET READ"] == "___ ___ 4:20 PM"
    assert sections["FINDINGS"] == "Heart size is normal.\n \tLungs are   clear."  # line breaks kept


def test_impression_is_the_caption():
    assert caption_from_report(MIMIC_STYLE_REPORT) == "No acute intrathoracic process."


def test_multi_line_impression_is_whitespace_normalised_and_keeps_deidentified_spans():
    report = (
        "FINDINGS: none\n\n  IMPRESSION:  Small\tleft  effusion,\n\n\t  new since ___.\r\n   RECOMMENDATION(S): CT."
    )
    assert caption_from_report(report) == "Small left effusion, new since ___."


def test_impression_falls_back_to_findings_and_findings_to_impression():
    assert caption_from_report(FINDINGS_ONLY_REPORT) == "Heart size is normal. Lungs are clear."
    assert caption_from_report(MIMIC_STYLE_REPORT, "findings") == (
        "PA and lateral views of the chest provided. There is no focal consolidation, effusion, or pneumothorax."
    )
    assert caption_from_report("IMPRESSION: Clear lungs.", "findings") == "Clear lungs."


def test_both_joins_findings_then_impression():
    assert caption_from_report(MIMIC_STYLE_REPORT, "both") == (
        "PA and lateral views of the chest provided. There is no focal consolidation, effusion, or "
        "pneumothorax. No acute intrathoracic process."
    )


def test_report_without_headers_gives_its_last_free_paragraph():
    report = "                 FINAL REPORT\n\nPA and lateral views.\n\n  The lungs   are clear.\n  No effusion.\n\n"
    assert caption_from_report(report) == "The lungs are clear. No effusion."


def test_free_paragraph_skips_header_paragraphs():
    report = "INDICATION: ___ with fever\n\nHeart size is normal.\n\nCOMPARISON: ___\n"
    assert caption_from_report(report) == "Heart size is normal."


def test_report_without_text_gives_empty_caption():
    assert caption_from_report("   FINAL REPORT\n\n IMPRESSION:   \n") == ""


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="history"):
        caption_from_report(MIMIC_STYLE_REPORT, "history")


def test_bert_long_caption_is_cut_at_the_last_fitting_token(minilm_tokenizer):
    text = "the heart is normal in size and the lungs are clear " * 10
    truncated, was_truncated = truncate_to_tokens(text, minilm_tokenizer, max_length=20)
    assert was_truncated
    assert text.startswith(truncated)
    ids = minilm_tokenizer(truncated)["input_ids"]
    assert len(ids) == 20  # every word is one WordPiece token, so the budget is used exactly
    assert ids[1:-1] == minilm_tokenizer(text)["input_ids"][1:19]


def test_short_caption_is_unchanged(minilm_tokenizer, bpe_tokenizer):
    text = "Small left pleural effusion."
    exact_length = len(minilm_tokenizer(text)["input_ids"])
    assert truncate_to_tokens(text, minilm_tokenizer, max_length=exact_length) == (text, False)
    assert truncate_to_tokens(text, bpe_tokenizer, max_length=77) == (text, False)


@pytest.mark.parametrize("max_length", [5, 12, 30])
def test_bpe_long_caption_fits_after_truncation(bpe_tokenizer, max_length):
    text = "Small right pleural effusion, unchanged since ___; adjacent atelectasis. " * 4
    assert len(bpe_tokenizer(text)["input_ids"]) > max_length
    truncated, was_truncated = truncate_to_tokens(text, bpe_tokenizer, max_length=max_length)
    assert was_truncated and truncated and text.startswith(truncated)
    assert max_length - 2 <= len(bpe_tokenizer(truncated)["input_ids"]) <= max_length


def test_budget_without_room_for_text_is_refused(minilm_tokenizer):
    with pytest.raises(ValueError, match="special tokens"):
        truncate_to_tokens("Clear lungs.", minilm_tokenizer, max_length=2)
