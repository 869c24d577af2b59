"""bench/offline_tokenizer.py (a helper the benches and tests build tokenizers with, not a script): CLIP's framing
and lower-casing, byte-level coverage of text it never saw, and padding, all without a download."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from offline_tokenizer import build_byte_level_bpe  # noqa: E402

SENTENCES = ["small left pleural effusion with adjacent atelectasis", "no acute cardiopulmonary process"] * 5


def test_captions_are_framed_lower_cased_and_round_trip():
    tokenizer = build_byte_level_bpe(SENTENCES)
    ids = tokenizer("Small LEFT pleural effusion")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "small left pleural effusion"
    assert ids == tokenizer("small left pleural effusion")["input_ids"]
    assert len(ids) < len("small left pleural effusion")  # merges learnt from the training sentences
    unseen = tokenizer("Pneumothorax: 2 cm!")["input_ids"]  # bytes it never saw still encode and decode
    assert tokenizer.decode(unseen, skip_special_tokens=True) == "pneumothorax: 2 cm!"
    assert len(tokenizer) <= 300


def test_padding_uses_the_given_token_and_none_by_default():
    assert build_byte_level_bpe(SENTENCES).pad_token is None
    tokenizer = build_byte_level_bpe(SENTENCES, pad_token="<|endoftext|>")
    batch = tokenizer(
        ["no acute process", "small effusion with adjacent atelectasis"], padding="max_length", max_length=24
    )
    assert [len(ids) for ids in batch["input_ids"]] == [24, 24]
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    real = sum(mask)
    assert 3 <= real < 24 and mask == [1] * real + [0] * (24 - real)
    assert ids[real:] == [tokenizer.pad_token_id] * (24 - real) and tokenizer.pad_token_id == tokenizer.eos_token_id
