"""Tokenization into the fixed-length, right-padded int32 arrays that :class:`ClientPool` holds.

Works with any ``transformers`` tokenizer loaded from a local directory
(``AutoTokenizer.from_pretrained(path)``). Classification gives ``input_ids``,
``attention_mask`` and ``labels`` (plus ``token_type_ids`` for text pairs when the tokenizer's
model uses segments, as BERT does; RoBERTa's does not); instruction data gives ``input_ids``,
``attention_mask`` and a ``loss_mask`` that is 1 only on response tokens.
"""

from __future__ import annotations

import warnings

import numpy as np

from fedlora_jax.data.loaders import ClassificationData, InstructionData

Examples = dict[str, np.ndarray]


def tokenize_classification(data: ClassificationData, tokenizer, max_length: int) -> Examples:
    """Pads/truncates every text (pair) to ``max_length`` tokens; segment ids come with pairs for
    tokenizers that list ``token_type_ids`` among their ``model_input_names``."""
    _check_max_length(max_length)
    segments = data.text_pairs is not None and "token_type_ids" in tokenizer.model_input_names
    enc = tokenizer(list(data.texts), list(data.text_pairs) if data.text_pairs else None,
                    max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="np", return_token_type_ids=segments)
    examples = {k: np.asarray(enc[k], np.int32) for k in enc}
    examples["labels"] = np.asarray(data.labels, np.int32)
    return examples


def tokenize_instructions(data: InstructionData, tokenizer, max_length: int) -> Examples:
    """Tokenizes ``prompt + response`` as one text (as LLM-Adapters does) and marks as targets
    the tokens whose character span reaches into the response, found from offset mappings, so the
    mask is exact whatever the tokenizer merges at the boundary. Like LLM-Adapters, an EOS token
    is appended (and trained on) when the text fits; truncation cuts the response from the right.
    """
    _check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_instructions needs a fast tokenizer (offset mappings); load it "
                         "with AutoTokenizer.from_pretrained(path) from a directory with "
                         "tokenizer.json.")
    texts = [p + r for p, r in zip(data.prompts, data.responses)]
    enc = tokenizer(texts, max_length=max_length, truncation=True, return_offsets_mapping=True)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    input_ids = np.full((len(texts), max_length), pad, np.int32)
    loss_mask = np.zeros((len(texts), max_length), np.int32)
    lengths = np.zeros(len(texts), np.int64)
    for row, (ids, offsets, prompt) in enumerate(zip(enc["input_ids"], enc["offset_mapping"],
                                                     data.prompts)):
        mask = [int(end > len(prompt)) for _, end in offsets]
        if eos is not None and ids and ids[-1] == eos:
            mask[-1] = 1
        elif eos is not None and len(ids) < max_length:
            ids, mask = [*ids, eos], [*mask, 1]
        input_ids[row, : len(ids)] = ids
        loss_mask[row, : len(ids)] = mask
        lengths[row] = len(ids)
    empty = int((loss_mask.sum(1) == 0).sum())
    if empty == len(texts):
        raise ValueError(f"{data.source!r}: no response token fits in max_length={max_length}; "
                         "increase max_length.")
    if empty:
        warnings.warn(f"{data.source!r}: {empty} of {len(texts)} examples keep no response token "
                      f"within max_length={max_length} and add nothing to the loss.")
    attention_mask = (np.arange(max_length) < lengths[:, None]).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
