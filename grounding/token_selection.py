"""Token selection for phrase grounding: which text tokens' attention maps make a phrase's heatmap.

Every word of the phrase that contains a query word of the finding category (case-insensitive, so
"effusions" contains "effusion") selects the tokens whose character offsets overlap it. Offsets make this
work for any subword tokenizer (WordPiece "e ##ff ##usion", byte-level BPE pieces, SentencePiece's T5 pieces). No
match → all text tokens (also when truncation cut every matching word off). Special tokens (BOS/EOS/CLS/SEP, T5's
</s>) and padding are never selected.

SentencePiece's word-start marker "▁" is a token of its own where the vocabulary has no "▁X..." piece for the word
(T5 spells " a" as "▁" + "a"). It is part of the word's spelling, as BPE's "Ġ" is inside "Ġeffusion", so it goes
with the word after it. Its offsets depend on how the fast tokenizer was built: transformers 5's T5Tokenizer (and
the Hub's T5 tokenizer.json, whitespace split off first) put it on the word's first character; transformers'
T5Converter (a bare Metaspace: transformers 4.x converting a spiece.model) on the space it replaced. A token that
covers only whitespace therefore counts as the first character after it, so both select the same tokens.
"""

from __future__ import annotations

import re
from typing import Any

QUERY_WORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Cardiomegaly": ("cardiomegaly", "cardiac"),
    "Consolidation": ("consolidation", "consolidations", "consolidative"),
    "Edema": ("edema",),
    "Lung Opacity": ("opacity", "opacities", "opacification"),
    "Pleural Effusion": ("pleural", "effusion", "effusions"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
}

# A word is a maximal run of letters and digits (Unicode): punctuation, hyphens, underscores and spaces
# separate words, so "pleural-effusion" is two words.
WORD_PATTERN = re.compile(r"[^\W_]+")

_QUERY_WORDS_BY_CATEGORY = {category.casefold(): words for category, words in QUERY_WORDS.items()}


def _attached_span(phrase: str, start: int, end: int) -> tuple[int, int]:
    """A token's character span; a whitespace-only one (a word-start marker) is the character that follows it."""
    return (end, end + 1) if phrase[start:end].isspace() else (start, end)


def select_phrase_tokens(phrase: str, category: str | None, tokenizer: Any, max_length: int) -> list[int]:
    """Sorted token indices (into the padded, truncated encoding of ``phrase``) whose attention to average.

    ``tokenizer`` must be a fast (Rust-backed) Hugging Face tokenizer, encoded here exactly as the model's text
    encoding: ``padding="max_length"``, ``truncation=True``, ``max_length``. The category is looked up
    case-insensitively in :data:`QUERY_WORDS`; ``None`` or an unknown category selects all text tokens.
    Every occurrence of a matching word is selected; each token index appears once.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"select_phrase_tokens needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}"
        )
    encoding = tokenizer(
        phrase,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=True,
    )
    text_tokens = [
        (index, _attached_span(phrase, *offsets))
        for index, (offsets, is_special, is_attended) in enumerate(
            zip(encoding["offset_mapping"], encoding["special_tokens_mask"], encoding["attention_mask"], strict=True)
        )
        if not is_special and is_attended and offsets[1] > offsets[0]
    ]
    if not text_tokens:
        raise ValueError(f"select_phrase_tokens: phrase {phrase!r} has no text tokens")
    query_words = _QUERY_WORDS_BY_CATEGORY.get(category.casefold(), ()) if category is not None else ()
    matched_spans = [
        word.span()
        for word in WORD_PATTERN.finditer(phrase)
        if any(query_word in word.group().casefold() for query_word in query_words)
    ]
    selected = [
        index
        for index, (token_start, token_end) in text_tokens
        if any(token_start < word_end and token_end > word_start for word_start, word_end in matched_spans)
    ]
    return selected or [index for index, _ in text_tokens]
