"""Every built-in recipe runs end to end at a micro size, through `lmforge run` as users call it.

Each test works in its own directory with the files a recipe's header asks for (texts/,
alpaca.jsonl, labeled.jsonl, model/) and shrinks the sizes with --set, exactly as a user would
try a recipe before launching it for real.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.artifacts import read_manifest
from lmforge.runner import run_recipe

pytestmark = pytest.mark.integration

MICRO_TRAIN = [
    "train.max_steps=3",
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.warmup_steps=0",
    "train.eval_every=3",
    "train.eval_steps=1",
    "train.ckpt_every=3",
    "train.compile=false",
]
TOPICS = {
    "rivers": "The river carries water from the hills to the sea and floods the valley in spring.",
    "stars": "A star burns hydrogen in its core and shines for billions of years in the sky.",
    "bread": "Bakers mix flour, water and yeast, let the dough rise, then bake the bread.",
}


def write_texts(folder: Path, n: int = 40) -> Path:
    """Varied English prose (random sentences over a vocabulary), enough to pass the filters."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = " ".join(TOPICS.values()).lower().replace(",", "").replace(".", "").split()
    for i in range(n):
        paragraphs = []
        for _ in range(5):
            sentences = [
                " ".join(rng.choice(words) for _ in range(rng.randint(8, 14))).capitalize() + "."
                for _ in range(4)
            ]
            paragraphs.append(" ".join(sentences))
        (folder / f"doc_{i}.txt").write_text("\n\n".join(paragraphs))
    return folder


def lenient_data() -> list[str]:
    return ["data.quality.preset=lenient", "data.language.enabled=false", "data.dedup.fuzzy=false"]


def micro_texts_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str) -> list[str]:
    """Works in tmp_path with texts/ written; the overrides that run a texts -> tokenizer ->
    pretrain recipe on them at micro size with the given model preset."""
    monkeypatch.chdir(tmp_path)
    write_texts(tmp_path / "texts")
    return [
        "data.source=[texts/]",
        *lenient_data(),
        "tokenizer.vocab_size=300",
        f"pretrain.model.preset={preset}",
        *MICRO_TRAIN,
    ]


def make_hf_checkpoint(root: Path) -> Path:
    """A tiny random Llama saved by transformers itself, with a tokenizer trained by lmforge."""
    transformers = pytest.importorskip("transformers")
    from lmforge.common.io import write_jsonl
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    data = root / "tok_data"
    data.mkdir(parents=True)
    texts = [{"text": t} for t in TOPICS.values()] * 30
    write_jsonl(data / "train.jsonl.zst", texts)
    write_jsonl(data / "val.jsonl.zst", texts[:5])
    tok_dir = train_tokenizer(TokenizerConfig(data=data, out=root / "tok", vocab_size=320))
    vocab = json.loads((tok_dir / "stats.json").read_text())["vocab_size"]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model_dir = root / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        (model_dir / name).write_bytes((tok_dir / name).read_bytes())
    return model_dir


def test_quickstart_recipe_micro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [
        *micro_texts_run(tmp_path, monkeypatch, "micro"),
        "train.seq_len=128",  # the explain prompts need room for an answer
        "sft.eval.rouge_examples=2",
        "lora.eval.rouge_examples=2",
        "eval.generation.max_new_tokens=4",
    ]
    results = dict(run_recipe("quickstart", out=tmp_path / "run", overrides=overrides))
    assert list(results) == [
        "tasks",
        "data",
        "tokenizer",
        "tokens",
        "pretrain",
        "sft",
        "lora",
        "classify",
        "eval",
        "eval_classifier",
    ]
    eval_json = json.loads((tmp_path / "run/eval/eval.json").read_text())
    assert {m["name"] if isinstance(m, dict) else m for m in eval_json["models"]} >= {
        "base",
        "sft",
        "lora",
    }
    assert (tmp_path / "run/lora/adapter/adapter_config.json").exists()
    again = run_recipe("quickstart", out=tmp_path / "run", overrides=overrides)
    assert all(r.cached for _, r in again)


def test_mlm_quickstart_recipe_micro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = micro_texts_run(tmp_path, monkeypatch, "bert-micro")
    run_recipe("mlm-quickstart", out=tmp_path / "run", overrides=overrides)
    metrics = read_manifest(tmp_path / "run/pretrain")["metrics"]
    assert metrics["objective"] == "mlm" and metrics["steps"] == 3
    assert metrics["initial_val_loss"] > 0 and metrics["val_loss"] > 0
    hf_config = json.loads((tmp_path / "run/pretrain/final/config.json").read_text())
    assert hf_config["architectures"] == ["BertForMaskedLM"]
    assert hf_config["lmforge"]["causal"] is False
    # the classify stage: a BERT classifier whose exported tokenizer adds [CLS] ... [SEP]
    clf = read_manifest(tmp_path / "run/classify")["metrics"]
    assert 0 <= clf["accuracy"] <= 1 and clf["majority_accuracy"] > 0
    final = tmp_path / "run/classify/final"
    assert json.loads((final / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("Return the path.")["input_ids"]
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["[CLS]", "[SEP]"]
    # the eval stages: the MLM's pseudo-perplexity (labelled) and the classifier through its head
    ppl = json.loads((tmp_path / "run/eval/eval.json").read_text())["results"]["mlm"]
    assert ppl["heldout_text"]["scoring"] == "pseudo_log_likelihood"
    assert ppl["heldout_text"]["pseudo_perplexity"] > 1 and "perplexity" not in ppl["heldout_text"]
    head = json.loads((tmp_path / "run/eval_classifier/eval.json").read_text())["results"]
    assert head["classifier"]["module_family"]["scoring"] == "head (first_token_pooler)"
    assert 0 <= head["classifier"]["module_family"]["accuracy"] <= 1


def test_pretrain_gpt2_recipe_micro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [
        *micro_texts_run(tmp_path, monkeypatch, "micro-gpt2"),
        "pretrain.train.tokens_per_step=null",
        "pretrain.train.warmup_steps=1",
    ]
    run_recipe("pretrain-gpt2", out=tmp_path / "run", overrides=overrides)
    manifest = read_manifest(tmp_path / "run/pretrain")
    assert manifest["metrics"]["steps"] == 3
    hf_config = json.loads((tmp_path / "run/pretrain/final/config.json").read_text())
    assert hf_config["model_type"] == "gpt2"
    assert read_manifest(tmp_path / "run/eval") is not None


def test_lora_alpaca_recipe_on_a_local_hf_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_hf_checkpoint(tmp_path)
    rows = [
        {"instruction": f"Describe {k}.", "input": "", "output": v} for k, v in TOPICS.items()
    ] * 8
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_recipe("lora-alpaca", out=tmp_path / "run", overrides=MICRO_TRAIN)
    adapter = tmp_path / "run/finetune/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "run/finetune/final/model.safetensors").exists()
    assert read_manifest(tmp_path / "run/eval") is not None


def test_classifier_kfold_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_hf_checkpoint(tmp_path)
    rows = [{"text": f"{v} ({i})", "label": k} for i in range(10) for k, v in TOPICS.items()]
    (tmp_path / "labeled.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_recipe(
        "classifier-kfold", out=tmp_path / "run", overrides=[*MICRO_TRAIN, "classify.kfold.k=3"]
    )
    metrics = read_manifest(tmp_path / "run/classify")["metrics"]
    assert any("std" in key for key in metrics), metrics


def test_domain_adapt_recipe_lowers_heldout_perplexity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_hf_checkpoint(tmp_path)
    write_texts(tmp_path / "domain")
    overrides = [
        *lenient_data(),
        *MICRO_TRAIN,
        "train.max_steps=30",
        "train.lr=3e-3",
        "train.eval_every=30",
        "train.ckpt_every=30",
        "train.seq_len=64",
    ]
    run_recipe("domain-adapt", out=tmp_path / "run", overrides=overrides)
    results = json.loads((tmp_path / "run/eval/eval.json").read_text())
    ppl = {
        model: tasks["domain_heldout"]["perplexity"] for model, tasks in results["results"].items()
    }
    assert ppl["after"] < 0.5 * ppl["before"], ppl
