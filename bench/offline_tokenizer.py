"""Offline stand-ins for real text models, built with random weights for benches and tests (no download).

``build_byte_level_bpe`` is a tiny CLIP-style tokenizer; ``build_t5_style_unigram`` a tiny T5-style SentencePiece
tokenizer, and ``write_tiny_t5_encoder`` saves it beside a random-initialised T5 encoder, as PixArt-Σ's text encoder
is loaded.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast


def build_byte_level_bpe(sentences: Sequence[str], pad_token: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny CLIP-style tokenizer trained offline: lower-cased byte-level BPE, <|startoftext|> ... <|endoftext|>."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(sentences), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(token, backend.token_to_id(token)) for token in ("<|startoftext|>", "<|endoftext|>")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad_token
    )


def build_t5_style_unigram(sentences: Sequence[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A tiny T5-style tokenizer trained offline: cased SentencePiece Unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.

    The pipeline is transformers' ``T5Tokenizer`` (v5) and the Hub's T5 tokenizer.json: whitespace dropped, every
    word starts with "▁" (Metaspace, prepend scheme "always"), no lower-casing, no BOS, ``</s>`` appended, padded
    on the right with ``<pad>``; 512 is the t5-* checkpoints' ``model_max_length`` (PixArt-Σ encodes 300).
    Deliberate differences from T5's: no ``Precompiled`` (nmt_nfkc) normalizer, whose character map only a real
    spiece.model holds; no ``<extra_id_N>`` sentinels (they serve span-corruption pre-training only); and printable
    ASCII is seeded into the alphabet so that text the training sentences lack still encodes without ``<unk>``,
    as it does with T5's 32k pieces.
    """
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
    )
    backend.train_from_iterator(list(sentences), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length)


def write_tiny_t5_encoder(
    folder: str | Path, sentences: Sequence[str], d_model: int = 32, max_length: int = 300, seed: int = 0
) -> Path:
    """Save a random-initialised T5 encoder and ``build_t5_style_unigram``'s tokenizer together in ``folder``.

    Shaped like PixArt-Σ's text encoder, T5 v1.1 (gated-GELU feed-forward, untied embeddings), at toy size: 2
    layers, 4 heads. ``max_length`` becomes the tokenizer's ``model_max_length`` (300 as PixArt-Σ's prompts);
    ``seed`` fixes the weights without touching the global random state. Returns the folder.
    """
    folder = Path(folder)
    tokenizer = build_t5_style_unigram(sentences, model_max_length=max_length)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
