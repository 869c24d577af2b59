"""A tiny CLIP-style tokenizer trained offline, for models built with random weights (benches and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


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
