from types import SimpleNamespace

import pytest

from grounding.token_selection import QUERY_WORDS, select_phrase_tokens
from tests.conftest import build_byte_level_bpe

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def wordpiece(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="module")
def byte_level_bpe():
    """Padded with "!", as SD v2's CLIP tokenizer is: a normal token, so padding must be told apart by the mask."""
    sentences = ["small left pleural effusion", "right lower lobe consolidation", "heart size is normal"]
    return build_byte_level_bpe(sentences * 3, pad_token="!")


def selected_tokens(phrase, category, tokenizer, max_length=MAX_LENGTH):
    indices = select_phrase_tokens(phrase, category, tokenizer, max_length)
    input_ids = tokenizer(phrase, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return indices, [input_ids[index] for index in indices]


def all_text_token_indices(phrase, tokenizer):
    """Text tokens sit right after the BOS/CLS token in both tokenizers under test."""
    return list(range(1, 1 + len(tokenizer(phrase, add_special_tokens=False)["input_ids"])))


def test_query_word_table_is_lowercase_and_covers_the_eight_findings():
    assert len(QUERY_WORDS) == 8
    assert all(word == word.casefold() for words in QUERY_WORDS.values() for word in words)


def test_pleural_effusion_selects_every_wordpiece_of_both_words(wordpiece):
    indices, ids = selected_tokens("Small left pleural effusion", "Pleural Effusion", wordpiece)
    assert wordpiece.convert_ids_to_tokens(ids) == ["pl", "##eur", "##al", "e", "##ff", "##usion"]
    assert indices == sorted(indices)


def test_consolidation_selects_only_its_word(wordpiece):
    _, ids = selected_tokens("Right lower lobe consolidation", "Consolidation", wordpiece)
    assert wordpiece.decode(ids) == "consolidation"


def test_a_word_containing_a_query_word_is_selected_once_per_occurrence(wordpiece):
    phrase = "Effusions: small effusion, stable effusion"
    indices, ids = selected_tokens(phrase, "Pleural Effusion", wordpiece)
    assert len(indices) == len(set(indices))
    assert wordpiece.decode(ids) == "effusions effusion effusion"


def test_word_boundaries_split_on_punctuation(wordpiece):
    _, ids = selected_tokens("pleural-effusion", "pleural effusion", wordpiece)
    assert wordpiece.decode(ids) == "pleural effusion"
    assert "-" not in wordpiece.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("category", ["Pleural Effusion", None, "Fracture"])
def test_no_matching_word_selects_all_text_tokens_and_no_special_ones(wordpiece, category):
    phrase = "Heart size is normal" if category else "Small left pleural effusion"
    indices, ids = selected_tokens(phrase, category, wordpiece)
    assert indices == all_text_token_indices(phrase, wordpiece)
    assert not set(ids) & set(wordpiece.all_special_ids)


def test_truncation_keeps_indices_inside_max_length(wordpiece):
    phrase = "Small left pleural effusion"
    indices, ids = selected_tokens(phrase, "Pleural Effusion", wordpiece, max_length=8)
    assert max(indices) < 7  # index 7 is [SEP]
    assert wordpiece.convert_ids_to_tokens(ids) == ["pl", "##eur", "##al", "e"]
    # Every matching word cut off: fall back to the text tokens that survived truncation.
    assert select_phrase_tokens(phrase, "Pleural Effusion", wordpiece, max_length=4) == [1, 2]


def test_byte_level_bpe_selects_the_pieces_of_the_matching_words(byte_level_bpe):
    indices, ids = selected_tokens("Small left pleural effusions", "Pleural Effusion", byte_level_bpe)
    assert len(indices) > 2
    assert byte_level_bpe.decode(ids).split() == ["pleural", "effusions"]


def test_byte_level_bpe_fallback_excludes_bos_eos_and_padding(byte_level_bpe):
    phrase = "Heart size is normal"
    indices, ids = selected_tokens(phrase, "Pneumothorax", byte_level_bpe)
    assert indices == all_text_token_indices(phrase, byte_level_bpe)
    assert byte_level_bpe.decode(ids) == "heart size is normal"


def test_slow_tokenizer_and_empty_phrase_are_rejected(wordpiece):
    with pytest.raises(TypeError, match="fast tokenizer"):
        select_phrase_tokens("effusion", "Pleural Effusion", SimpleNamespace(is_fast=False), MAX_LENGTH)
    with pytest.raises(ValueError, match="no text tokens"):
        select_phrase_tokens("", "Pleural Effusion", wordpiece, MAX_LENGTH)
