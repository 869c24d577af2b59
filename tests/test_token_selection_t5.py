"""Token selection on T5's SentencePiece tokens (PixArt-Σ's text encoder), with bench/offline_tokenizer.py's tiny
T5-style tokenizer and encoder: no download.

SentencePiece marks each word's start with "▁" and, when the vocabulary has no "▁X..." piece for the word, emits the
marker as a token of its own (T5 spells " a" as "▁" + "a"). That token is part of the word's spelling, as BPE's
"Ġ" is inside "Ġeffusion", so it is selected with its word and never with a neighbour. Two offset conventions
exist for it: transformers 5's T5Tokenizer (and the Hub's T5 tokenizer.json: whitespace split off first) gives it
the word's first character; transformers' T5Converter (a bare Metaspace, how transformers 4.x builds a fast T5
tokenizer from a spiece.model) gives it the space it replaced. Selection must not depend on which one a checkpoint
was loaded with.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5EncoderModel, T5TokenizerFast
from transformers.convert_slow_tokenizer import T5Converter, import_protobuf

from bench.offline_tokenizer import build_t5_style_unigram, write_tiny_t5_encoder
from grounding.token_selection import select_phrase_tokens

SENTENCES = [
    "Small left pleural effusion.",
    "Moderate cardiomegaly, no pneumothorax",
    "small bilateral pleural effusions with adjacent atelectasis",
    "Right lower lobe consolidation.",
    "Heart size is normal. No pleural effusion or pneumothorax.",
    "Mild pulmonary edema and stable cardiomegaly",
] * 4
MAX_LENGTH = 32
# (phrase, category, the query words it holds). Capitalised words the training sentences never start a word with
# ("Cardiomegaly", "Pleural") are spelt with a standalone "▁".
CASES = [
    ("Small left pleural effusion.", "Pleural Effusion", ["pleural", "effusion"]),
    ("Moderate cardiomegaly, no pneumothorax", "Cardiomegaly", ["cardiomegaly"]),
    ("Stable Cardiomegaly", "Cardiomegaly", ["Cardiomegaly"]),
    ("Left Pleural Effusion", "Pleural Effusion", ["Pleural", "Effusion"]),
    ("No pneumothorax. Small effusions", "Pleural Effusion", ["effusions"]),
]


@pytest.fixture(scope="module")
def t5_style():
    return build_t5_style_unigram(SENTENCES)


@pytest.fixture(scope="module")
def converted(t5_style, tmp_path_factory):
    """The same vocabulary through transformers' T5Converter, from a tiny spiece.model written with protobuf.

    The model proto holds T5's settings (Unigram, <pad>/</s> control pieces, unk id 2, no BOS, dummy prefix); the
    converter reads only ``vocab_file``, ``_extra_ids`` and ``convert_tokens_to_ids`` of the slow tokenizer it is
    normally given, so a namespace stands in for that one (it needs the sentencepiece package).
    """
    proto = import_protobuf().ModelProto()
    for index, (piece, score) in enumerate(trained_vocab(t5_style)):
        proto.pieces.add(piece=piece, score=score, type={0: 3, 1: 3, 2: 2}.get(index, 1))
    proto.trainer_spec.model_type, proto.trainer_spec.unk_id = 1, 2
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.bos_id = 0, 1, -1
    spiece = tmp_path_factory.mktemp("spiece") / "spiece.model"
    spiece.write_bytes(proto.SerializeToString())
    slow = SimpleNamespace(vocab_file=str(spiece), _extra_ids=0, convert_tokens_to_ids=t5_style.convert_tokens_to_ids)
    return PreTrainedTokenizerFast(
        tokenizer_object=T5Converter(slow).converted(), eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def trained_vocab(tokenizer):
    """(piece, score) pairs in id order, as a spiece.model lists them."""
    return [tuple(piece) for piece in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]]


def selected_pieces(phrase, category, tokenizer, max_length=MAX_LENGTH):
    indices = select_phrase_tokens(phrase, category, tokenizer, max_length)
    input_ids = tokenizer(phrase, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return tokenizer.convert_ids_to_tokens([input_ids[index] for index in indices])


def encode(tokenizer, phrase):
    encoding = tokenizer(phrase, return_offsets_mapping=True)
    return tokenizer.convert_ids_to_tokens(encoding["input_ids"]), encoding["offset_mapping"]


def test_tokenizer_is_shaped_like_t5s(t5_style):
    assert [t5_style.pad_token_id, t5_style.eos_token_id, t5_style.unk_token_id] == [0, 1, 2]
    assert t5_style.bos_token is None and t5_style.padding_side == "right" and t5_style.model_max_length == 512
    batch = t5_style(["No pneumothorax", "Small left pleural effusion."], padding="max_length", max_length=MAX_LENGTH)
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    real = sum(mask)
    assert (
        ids[real - 1] == 1
        and ids[real:] == [0] * (MAX_LENGTH - real)
        and mask == [1] * real + [0] * (MAX_LENGTH - real)
    )
    assert t5_style.tokenize("Effusion") != t5_style.tokenize("effusion")  # cased, as T5
    unseen = "Apical PTX: 2 cm (stable)!"  # characters no training sentence has still encode, without <unk>
    assert t5_style.unk_token_id not in t5_style(unseen)["input_ids"]
    assert t5_style.decode(t5_style(unseen)["input_ids"], skip_special_tokens=True) == unseen
    assert len(t5_style) <= 300


def test_tokenizer_encodes_as_transformers_t5_tokenizer_does(t5_style):
    """transformers' own T5 pipeline, built on our vocabulary: same pieces, same offsets, same special tokens."""
    reference = T5TokenizerFast(vocab=trained_vocab(t5_style), extra_ids=0)
    for phrase, _, _ in CASES:
        assert encode(t5_style, phrase) == encode(reference, phrase)


def test_save_pretrained_round_trips_through_auto_tokenizer_offline(t5_style, tmp_path):
    tokenizer = build_t5_style_unigram(SENTENCES, model_max_length=300)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(reloaded, T5TokenizerFast) and reloaded.model_max_length == 300
    for phrase, _, _ in CASES:
        assert encode(reloaded, phrase) == encode(t5_style, phrase)
        assert (
            reloaded(phrase, padding="max_length", truncation=True)["input_ids"]
            == tokenizer(phrase, padding="max_length", truncation=True)["input_ids"]
        )


def test_standalone_word_marker_offsets_in_both_conventions(t5_style, converted):
    """The evidence behind the module docstring, on "Stable Cardiomegaly" -> ▁ S ta b le ▁ C ar ... </s>."""
    pieces, offsets = encode(t5_style, "Stable Cardiomegaly")
    converted_pieces, converted_offsets = encode(converted, "Stable Cardiomegaly")
    assert pieces == converted_pieces and pieces[:2] == ["▁", "S"] and pieces[5:7] == ["▁", "C"]
    assert offsets[5] == offsets[6] == (7, 8)  # T5Tokenizer: the marker is on the word's first character
    assert converted_offsets[5] == (6, 7)  # T5Converter: the marker is the space before the word
    assert offsets[0] == converted_offsets[0] == (0, 1)  # the first word's marker has no space: both on "S"
    assert offsets[-1] == converted_offsets[-1] == (0, 0)  # </s>
    # A merged "▁p" (left pleural -> ▁ l ef t ▁p l ...) keeps its space in T5Converter's offsets only.
    (pieces, offsets), (_, converted_offsets) = encode(t5_style, "left pleural"), encode(converted, "left pleural")
    assert pieces[4] == "▁p" and offsets[4] == (5, 6) and converted_offsets[4] == (4, 6)


@pytest.mark.parametrize(("phrase", "category", "words"), CASES)
def test_selection_is_the_query_words_pieces_and_nothing_else(t5_style, phrase, category, words):
    """Each query word's own pieces, standalone "▁" included; never a neighbour's, punctuation, </s> or <pad>."""
    pieces = selected_pieces(phrase, category, t5_style)
    assert pieces == [piece for word in words for piece in t5_style.tokenize(word)]
    assert "</s>" not in pieces and "<pad>" not in pieces
    if phrase == "Stable Cardiomegaly":  # the case this file is about: "Stable" has its own "▁" too
        assert pieces[0] == "▁" and t5_style.tokenize(phrase).count("▁") == 2


@pytest.mark.parametrize(("phrase", "category", "words"), CASES)
def test_both_offset_conventions_select_the_same_tokens(t5_style, converted, phrase, category, words):
    assert converted(phrase)["input_ids"] == t5_style(phrase)["input_ids"]
    assert select_phrase_tokens(phrase, category, converted, MAX_LENGTH) == select_phrase_tokens(
        phrase, category, t5_style, MAX_LENGTH
    )


@pytest.mark.parametrize("category", [None, "Pneumothorax"])
def test_no_match_selects_every_text_token_before_eos(t5_style, converted, category):
    phrase = "Stable Cardiomegaly"
    text_tokens = len(t5_style.tokenize(phrase))
    for tokenizer in (t5_style, converted):
        assert select_phrase_tokens(phrase, category, tokenizer, MAX_LENGTH) == list(range(text_tokens))


def test_truncation_keeps_eos_last_and_never_selects_it(t5_style):
    phrase = "Small left pleural effusion."  # ▁ S mal l ▁ l ef t ▁p l eu ra l ▁effusion . </s>
    input_ids = t5_style(phrase, padding="max_length", truncation=True, max_length=10)["input_ids"]
    assert input_ids[-1] == t5_style.eos_token_id  # T5 appends </s> after truncating
    assert select_phrase_tokens(phrase, "Pleural Effusion", t5_style, max_length=10) == [8]
    assert selected_pieces(phrase, "Pleural Effusion", t5_style, max_length=10) == ["▁p"]


def test_tiny_t5_encoder_loads_offline_and_its_mask_hides_padding(tmp_path):
    folder = write_tiny_t5_encoder(tmp_path / "t5", SENTENCES, d_model=32, max_length=300)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
    assert tokenizer.model_max_length == 300 and encoder.config.d_model == 32
    assert encoder.config.vocab_size == len(tokenizer) and encoder.config.is_gated_act
    captions = ["Small left pleural effusion.", "Stable Cardiomegaly"]
    batch = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")  # to model_max_length
    assert batch["input_ids"].shape == (2, 300)
    with torch.no_grad():
        masked = encoder(**batch).last_hidden_state
        unmasked = encoder(input_ids=batch["input_ids"]).last_hidden_state
        for row, caption in enumerate(captions):
            alone = tokenizer(caption, return_tensors="pt")
            real = alone["input_ids"].shape[1]
            assert torch.allclose(masked[row, :real], encoder(**alone).last_hidden_state[0], atol=1e-5)
            assert not torch.allclose(unmasked[row, :real], masked[row, :real], atol=1e-3)  # padding seen otherwise


def test_tiny_t5_encoder_weights_follow_the_seed_only(tmp_path):
    state = torch.random.get_rng_state()
    weights = [
        T5EncoderModel.from_pretrained(
            write_tiny_t5_encoder(tmp_path / f"{seed}-{copy}", SENTENCES, seed=seed)
        ).shared.weight
        for seed, copy in ((0, 0), (0, 1), (1, 0))
    ]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
