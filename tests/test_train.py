"""End to end through the user's path: their own Hugging Face directory and their own data file."""

import json

import numpy as np
import pytest
import transformers

from fedlora_jax.config import load_config
from fedlora_jax.data.builtin import minilm_path, pydoc_corpus
from fedlora_jax.train import train


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A tiny BERT checkpoint (with MiniLM's real tokenizer) and a TSV of real passages."""
    root = tmp_path_factory.mktemp("user")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cfg = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, num_labels=3)
    model_dir = root / "model"
    transformers.BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = pydoc_corpus()
    keep = np.flatnonzero(corpus.labels < 3)[:120]
    rows = ["sentence\tlabel"] + [f"{' '.join(corpus.texts[i].split())}\t{corpus.labels[i]}"
                                  for i in keep]
    data = root / "train.tsv"
    data.write_text("\n".join(rows) + "\n")
    return model_dir, data


def test_run_on_a_users_checkpoint_and_file(user_files, tmp_path):
    model_dir, data = user_files
    cfg = load_config(overrides=[
        f"model.source={model_dir}", f"data.source={data}", "data.partition=dirichlet",
        "data.num_clients=6", "data.max_length=32", "federation.rounds=2",
        "federation.participants=3", "federation.chunk_size=4", "eval_every=1",
        f"output_dir={tmp_path}"])
    history = train(cfg, progress="none", log=lambda *_: None)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(np.isfinite(h["eval_loss"]) for h in history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["source"] == str(model_dir)


def test_missing_column_in_users_file_names_it(user_files, tmp_path):
    model_dir, data = user_files
    cfg = load_config(overrides=[f"model.source={model_dir}", f"data.source={data}",
                                 "data.partition=iid", "data.label_column=target",
                                 f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="target"):
        train(cfg, progress="none", log=lambda *_: None)


def test_causal_lm_run_on_a_llama_checkpoint_and_instruction_file(tmp_path):
    """A LLaMA-family decoder fine-tuned on LLM-Adapters data: the loss covers responses only."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    model_dir = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = pydoc_corpus()
    records = [{"instruction": "Which chapter of the Python reference is this from?",
                "input": " ".join(corpus.texts[i].split()[:8]),
                "output": f"The answer is {corpus.labels[i]}", "answer": str(corpus.labels[i])}
               for i in range(0, 600, 10)]
    data = tmp_path / "commonsense.json"
    data.write_text(json.dumps(records))
    run = load_config(overrides=[
        f"model.source={model_dir}", f"data.source={data}", "data.partition=dirichlet",
        "data.alpha=0.5", "data.num_clients=4", "data.max_length=96", "federation.rounds=2",
        "federation.participants=2", "federation.chunk_size=2", "eval_every=1",
        "lora.targets=[q_proj, v_proj]", "lora.modules_to_save=[]", f"output_dir={tmp_path / 'out'}"])
    history = train(run, progress="none", log=lambda *_: None)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(np.isfinite(h["eval_loss"]) for h in history)
    with pytest.raises(ValueError, match="instruction data"):
        train(load_config(overrides=[f"model.source={model_dir}", "data.partition=iid",
                                     f"output_dir={tmp_path / 'bad'}"]),
              progress="none", log=lambda *_: None)
