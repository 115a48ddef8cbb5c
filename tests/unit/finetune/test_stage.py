"""The finetune stage end to end on a micro model: outputs, LoRA adapter, classify, k-fold, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import ConfigError
from lmforge.finetune import fit as ft
from lmforge.finetune import heads
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.convert import ClassifierHead, load_classifier, load_pretrained, save_pretrained
from lmforge.train.loader import RowBatches

WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value", "path", "join"]
TRAIN = {
    "max_steps": 6,
    "lr": 3e-3,
    "micro_batch_size": 4,
    "seq_len": 64,
    "warmup_steps": 1,
    "eval_every": 3,
    "eval_steps": 2,
    "ckpt_every": 3,
}


def _alpaca(path, n=40):
    rows = [
        {"instruction": f"Repeat {WORDS[i % 8]}", "output": f"{WORDS[i % 8]} {WORDS[i % 8]}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _labeled(path, n=48):
    rows = [
        {"text": f"{WORDS[i % 4]} {WORDS[(i * 3) % 8]} text", "label": WORDS[i % 4]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, model_dir, data, **kw):
    values = {
        "model": model_dir,
        "data": data,
        "out": tmp_path / "out",
        "train": dict(TRAIN),
        "eval": {"rouge_examples": 2, "max_new_tokens": 6},
        **kw,
    }
    return FinetuneConfig.model_validate(values)


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_lora_sft_writes_merged_model_adapter_and_metrics(tmp_path, model_dir):
    out = finetune(
        _cfg(tmp_path, model_dir, _alpaca(tmp_path / "d.jsonl"), method="lora", lora={"r": 2})
    )
    m = _manifest(out)["metrics"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "final" / name).is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    tok = load_chat_tokenizer(model_dir)  # eos is <|im_end|>, which also ends the chat turn
    assert json.loads((out / "final" / "generation_config.json").read_text()) == {
        "eos_token_id": [tok.token_id("<|im_end|>")],
        "pad_token_id": tok.token_id("<|pad|>"),
    }
    assert (out / "loss.png").stat().st_size > 1000
    assert 0 < m["trainable_fraction"] < 0.2 and m["steps"] == 6
    assert {"val_loss", "base_val_loss", "rouge_l", "base_rouge_l"} <= set(m)
    # the merged final model differs from the base exactly where adapters were
    base, tuned = (
        load_file(model_dir / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all("proj" in k for k in changed)
    assert any("q_proj" in k for k in changed)
    # PEFT puts adapter/ on the base and gets what our merged final/ gives
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    auto = transformers.AutoModelForCausalLM
    with_adapter = peft.PeftModel.from_pretrained(auto.from_pretrained(model_dir), out / "adapter")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = auto.from_pretrained(out / "final").eval()(ids).logits
        assert torch.allclose(with_adapter.eval()(ids).logits, merged, atol=1e-4)


def test_full_sft_with_frozen_layers_leaves_them_untouched(tmp_path, model_dir):
    out = finetune(
        _cfg(
            tmp_path,
            model_dir,
            _alpaca(tmp_path / "d.jsonl"),
            freeze={"first_n_layers": 1, "embeddings": True},
            eval={"rouge_examples": 0},
        )
    )
    base, tuned = (
        load_file(model_dir / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    assert torch.equal(
        base["model.layers.0.mlp.up_proj.weight"], tuned["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        base["model.layers.1.mlp.up_proj.weight"], tuned["model.layers.1.mlp.up_proj.weight"]
    )


def test_classify_reports_metrics_and_exports_a_sequence_classifier(tmp_path, model_dir):
    cfg = _cfg(
        tmp_path,
        model_dir,
        _labeled(tmp_path / "c.jsonl"),
        task="classify",
        train={**TRAIN, "max_steps": 12, "ckpt_every": 0},
        kfold={"k": 2},
    )
    out = finetune(cfg)
    m = _manifest(out)["metrics"]
    for key in (
        "accuracy",
        "precision",
        "recall",
        "macro_f1",
        "majority_macro_f1",
        "cv_macro_f1_mean",
        "cv_macro_f1_std",
    ):
        assert key in m
    assert m["cv_folds"] == 2
    assert len(json.loads((out / "folds" / "folds.json").read_text())) == 2
    final = out / "final"
    assert not (final / "generation_config.json").exists()  # a classifier generates nothing
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(WORDS[:4]))}
    tok = load_chat_tokenizer(final)
    assert config["pad_token_id"] == tok.pad_id
    assert not (final / "head.safetensors").exists() and not (final / "labels.json").exists()
    assert load_file(final / "model.safetensors")["score.weight"].shape == (4, 64)
    _assert_transformers_agrees(final, tok, ["alpha beta text", "path<|pad|>", "join"])


def _assert_transformers_agrees(final, tok, texts):
    """AutoModelForSequenceClassification loads final/ cleanly and gives our logits."""
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        final, output_loading_info=True
    )
    assert not any(info.values()), info
    head = load_classifier(final)
    ours = heads.SequenceClassifier(load_pretrained(final), len(head.labels)).eval()
    ours.head.weight.data.copy_(head.weight)
    rows, _ = heads.encode_texts(tok, texts, [0] * len(texts), seq_len=16)
    ids, last = torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"])
    with torch.no_grad():
        diff = ours(ids, last)[0] - hf.eval()(ids).logits
    assert diff.abs().max().item() <= 1e-4


def test_a_classifier_base_model_starts_the_head_from_its_own(tmp_path, model_dir):
    import shutil

    base = shutil.copytree(model_dir, tmp_path / "base")
    lm = load_pretrained(model_dir)
    weight = torch.randn(3, lm.config.n_embd)
    save_pretrained(lm, base, classifier=ClassifierHead(weight, ["gamma", "alpha", "beta"]))
    cfg = _cfg(tmp_path, base, tmp_path / "c.jsonl", task="classify")
    model, _ = ft.build_model(cfg, ["alpha", "beta", "gamma"])
    assert torch.equal(model.head.weight.data, weight[[1, 2, 0]])
    model, _ = ft.build_model(cfg, ["alpha", "beta", "delta"])
    assert not torch.equal(model.head.weight.data, weight[[1, 2, 0]])


def test_task_and_data_must_agree(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="--task classify"):
        finetune(_cfg(tmp_path, model_dir, _labeled(tmp_path / "c.jsonl")))


class _Killed(RowBatches):
    def __next__(self):
        if self.position == 4:
            raise KeyboardInterrupt("killed")
        return super().__next__()


@pytest.mark.parametrize("quantize", ["none", "int4"])  # int4: checkpoints repacked at load
def test_killed_run_resumes_to_the_same_weights(tmp_path, model_dir, monkeypatch, quantize):
    data = _labeled(tmp_path / "c.jsonl")
    kw = {"task": "multitask", "method": "lora", "eval": {"rouge_examples": 0}}
    kw["lora"] = {"quantize": quantize}
    full = finetune(_cfg(tmp_path / "a", model_dir, data, **kw))
    monkeypatch.setattr(ft, "RowBatches", _Killed)
    cfg = _cfg(tmp_path / "b", model_dir, data, **kw)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg)
    monkeypatch.setattr(ft, "RowBatches", RowBatches)
    resumed = finetune(cfg)
    assert _manifest(resumed)["metrics"]["resumed_from_step"] == 3
    a, b = (
        load_file(full / "final" / "model.safetensors"),
        load_file(resumed / "final" / "model.safetensors"),
    )
    assert "score.weight" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_model_may_be_a_training_stage_directory(tmp_path, model_dir):
    import shutil

    shutil.copytree(model_dir, tmp_path / "pretrain" / "final")
    cfg = _cfg(tmp_path, tmp_path / "pretrain", tmp_path / "d.jsonl")
    assert cfg.model_dir() == tmp_path / "pretrain" / "final"
    assert _cfg(tmp_path, model_dir, tmp_path / "d.jsonl").model_dir() == model_dir
