"""Segment ids end to end: a text-pair file run through ``fedlora-jax run`` with a tiny BERT directory
(random weights, a word-level tokenizer) carries ``token_type_ids`` into the client pool, the
sampled minibatches, the held-out set and the model."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fedlora_jax import cli, train  # noqa: E402
from fedlora_jax.data.loaders import load_classification  # noqa: E402
from fedlora_jax.data.pool import sample_batches  # noqa: E402
from fedlora_jax.data.tokenize import tokenize_classification  # noqa: E402
from tests import compile_cache  # noqa: E402

WORDS = ("red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "sings", "the", "a")
MAX_LENGTH = 12


def _tiny_bert(directory) -> transformers.PreTrainedTokenizerBase:
    """A two-layer random BERT with a word-level tokenizer, saved as a model directory."""
    directory.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    return tokenizer


def _pairs_file(path, rows: int = 48) -> None:
    """Sentence pairs labelled 1 when both name the same animal."""
    rng = np.random.default_rng(0)
    animals = ("cat", "dog", "bird")
    lines = ["sentence1\tsentence2\tlabel"]
    for _ in range(rows):
        first, second = rng.choice(animals, 2)
        lines.append(f"the {rng.choice(WORDS[:3])} {first} runs\ta {second} "
                     f"{rng.choice(WORDS[6:9])}\t{int(first == second)}")
    path.write_text("\n".join(lines) + "\n")


def test_pair_run_carries_segment_ids_to_the_model(tmp_path, monkeypatch):
    compile_cache.enable()
    model_dir, data = tmp_path / "bert", tmp_path / "pairs.tsv"
    _tiny_bert(model_dir)
    _pairs_file(data)
    built = []
    real_build = train.build
    monkeypatch.setattr(train, "build", lambda cfg: built.append(real_build(cfg)) or built[-1])
    assert cli.main(["run", "--model", str(model_dir), "--data", str(data), "--clients", "4",
                     "--rounds", "1", "--quiet", "--output-dir", str(tmp_path / "out"),
                     "--set", "data.partition=iid", "--set", f"data.max_length={MAX_LENGTH}",
                     "--set", "federation.participants=2", "--set", "eval_every=1"]) == 0
    setup, = built
    examples = {k: np.asarray(v) for k, v in setup.engine.pool.examples.items()}
    segments, mask = examples["token_type_ids"], examples["attention_mask"]
    # every pair marks its second text (after the first [SEP]) as segment 1, and nothing else
    first_sep = (examples["input_ids"] == 3).argmax(1)
    expected = (np.arange(MAX_LENGTH) > first_sep[:, None]) & mask.astype(bool)
    np.testing.assert_array_equal(segments, expected.astype(np.int32))
    assert segments.sum(1).min() > 0
    batches = sample_batches(setup.engine.pool, jax.numpy.int32(0), jax.random.key(0), 2, 4)
    assert batches["token_type_ids"].shape == (2, 4, MAX_LENGTH)

    heldout = setup.heldout
    assert heldout["token_type_ids"].max() == 1
    state = setup.engine.init()
    with_segments = setup.engine.evaluate(state, heldout)
    without = setup.engine.evaluate(state, {**heldout, "token_type_ids": np.zeros_like(
        heldout["token_type_ids"])})
    assert abs(with_segments["loss"] - without["loss"]) > 1e-6  # the model reads them


def test_segment_ids_only_for_tokenizers_that_use_them(tmp_path):
    """BERT's tokenizer lists ``token_type_ids`` among its model inputs; RoBERTa's does not, and
    its single-segment models get none."""
    tokenizer = _tiny_bert(tmp_path / "bert")
    _pairs_file(tmp_path / "pairs.tsv", rows=4)
    data = load_classification(tmp_path / "pairs.tsv")
    assert "token_type_ids" in tokenize_classification(data, tokenizer, MAX_LENGTH)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as RobertaTokenizerFast's
    assert "token_type_ids" not in tokenize_classification(data, tokenizer, MAX_LENGTH)
    single = dataclasses.replace(data, text_pairs=None)
    assert "token_type_ids" not in tokenize_classification(single, tokenizer, MAX_LENGTH)
