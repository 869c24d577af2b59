"""Text conditioning of the diffusion module: tokenized as the backbone's pipeline tokenizes, encoded, cached.

A mixin of ``LatentDiffusionModule`` (it reads the module's tokenizer, text encoder, backbone, device and which parts
train): the text path is one concern with its own invariants (a cached feature never depends on the batch that
filled it; evaluation never touches the training cache), kept apart from the objective and the checkpoint hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from transformers import BatchEncoding


def text_feature_batch_size(cfg: DictConfig) -> int:
    """``train.text_feature_batch_size``; null: 1 on CPU, where padding rows cost their FLOPs, and a data batch
    on an accelerator, where one call replaces one per miss (bench/text_cache.py)."""
    if cfg.train.text_feature_batch_size is not None:
        return int(cfg.train.text_feature_batch_size)
    accelerator = str(cfg.trainer.accelerator)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return 1 if on_cpu else int(cfg.data.batch_size)


class TextConditioning:
    """Text features and padding masks for a ``LatentDiffusionModule`` (see the module docstring)."""

    def _tokens(self, captions: Sequence[str]) -> BatchEncoding:
        """Token ids and padding mask, as the backbone's pipeline tokenizes (its caption rewriting, padded length)."""
        return self.tokenizer(
            self.backbone.prepare_captions(captions),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(self.device)

    def text_mask(self, captions: Sequence[str]) -> torch.Tensor | None:
        """The captions' padding mask (1 = token, 0 = padding) for a denoiser whose cross-attention uses it
        (PixArt's); None for one that sees no mask (the UNet, as Stable Diffusion), which then costs no tokenizing."""
        return self._tokens(captions).attention_mask if self.backbone.always_masks_text else None

    def _run_text_encoder(self, captions: Sequence[str], text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
        text_encoder = self.text_encoder if text_encoder is None else text_encoder
        tokens = self._tokens(captions)
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        with torch.set_grad_enabled(self.training and "text_encoder" in self.trainable):
            output = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)
        return output[0]

    def evaluation_text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Text features from the evaluation weights (``evaluation_parts``), never read from or written to the
        training cache: an evaluation leaves what training computes unchanged."""
        return self._run_text_encoder(captions, self.evaluation_parts().text_encoder)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Text features; a frozen encoder's are cached per caption (most of a small model's step otherwise).

        A batch's misses are encoded together (``_encode_misses``), least recently used captions are evicted.
        """
        if self.text_feature_cache_size == 0 or "text_encoder" in self.trainable:
            return self._run_text_encoder(captions)
        cache = self.text_feature_cache
        misses = list(dict.fromkeys(caption for caption in captions if caption not in cache))
        cache.update(zip(misses, self._encode_misses(misses), strict=True))
        features = []
        for caption in captions:
            cache.move_to_end(caption)
            features.append(cache[caption])
        while len(cache) > self.text_feature_cache_size:
            cache.popitem(last=False)
        return torch.stack(features)

    def _encode_misses(self, captions: list[str]) -> list[torch.Tensor]:
        """Features of uncached captions, in encoder calls of exactly ``text_feature_batch_size`` captions.

        A cached feature must not depend on which batch filled it: a resumed run, whose cache starts empty, has to
        compute bit-identical features. Every call has the same shape (the last chunk padded with empty captions),
        so each caption goes through the same kernels whatever its companions; rows never interact.
        """
        size, features = self.text_feature_batch_size, []
        for start in range(0, len(captions), size):
            chunk = captions[start : start + size]
            encoded = self._run_text_encoder([*chunk, *[""] * (size - len(chunk))]).detach()
            features += [row.clone() for row in encoded[: len(chunk)]]  # not views that keep the padding alive
        return features
