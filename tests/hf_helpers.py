"""Tiny ``transformers`` reference models shared by the model and PEFT parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TOL = 1e-4
VOCAB, LENGTH = 96, 12

ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, num_labels=3)
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0)


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second right-padded; ids avoid the pad tokens 0 and 1."""
    ids = np.random.default_rng(seed).integers(2, VOCAB, size=(2, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def save_torch(tmp_path, config_cls: str, model_cls: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(tmp_path)
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray, **inputs: np.ndarray) -> np.ndarray:
    """Logits of the torch model; ``inputs`` adds integer inputs (``token_type_ids``, ``position_ids``)."""
    extra = {k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    **extra)
    return out.logits.numpy()


def assert_close_on_valid(ours, ref, mask):
    """Compares all of (B, C) outputs, or the valid positions of (B, T, V) outputs."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    if ours.ndim == 3:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
