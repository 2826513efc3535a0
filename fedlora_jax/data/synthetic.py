"""Synthetic token classification: instant, any size, and learnable, for tests and client sweeps.

Token 0 is padding and tokens ``1..K`` are class markers; every other position holds a uniform
noise token from ``K+1..V-1``. A sequence of class ``c`` carries ``num_markers`` copies of
marker ``c`` at random positions, so the label is a simple function of the tokens (which marker
occurs) that a bag-of-words model, and hence any transformer with pooling, learns in few steps.
"""

from __future__ import annotations

import numpy as np

from fedlora_jax.data.partition import Seed


def synthetic_classification(seed: Seed, num_examples: int, seq_len: int, vocab_size: int,
                             num_labels: int, *, num_markers: int = 2) -> dict[str, np.ndarray]:
    """``input_ids``/``attention_mask`` (M, L) and ``labels`` (M,), int32; lengths are uniform in
    ``[max(num_markers, L // 2), L]`` and labels uniform over ``num_labels`` classes."""
    if vocab_size < num_labels + 2:
        raise ValueError(f"vocab_size={vocab_size} leaves no noise tokens; it must be at least "
                         f"num_labels + 2 = {num_labels + 2}.")
    if not 1 <= num_markers <= seq_len:
        raise ValueError(f"num_markers must lie in [1, seq_len={seq_len}], got {num_markers}.")
    if num_examples < 1 or num_labels < 2:
        raise ValueError(f"Need num_examples >= 1 and num_labels >= 2, got {num_examples} and "
                         f"{num_labels}.")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, num_examples)
    lengths = rng.integers(max(num_markers, seq_len // 2), seq_len + 1, num_examples)
    positions = np.arange(seq_len)
    attention_mask = positions < lengths[:, None]
    input_ids = rng.integers(num_labels + 1, vocab_size, (num_examples, seq_len))
    # The num_markers smallest random keys among a row's valid positions mark random distinct slots.
    keys = np.where(attention_mask, rng.random((num_examples, seq_len)), np.inf)
    slots = np.argsort(keys, axis=1)[:, :num_markers]
    np.put_along_axis(input_ids, slots, (labels + 1)[:, None], axis=1)
    input_ids = np.where(attention_mask, input_ids, 0)
    return {"input_ids": input_ids.astype(np.int32),
            "attention_mask": attention_mask.astype(np.int32), "labels": labels.astype(np.int32)}
