"""Task runners score the way lm-evaluation-harness does and read the user's task files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings, cut_at_stop
from lmforge.evals.tasks import TaskSpec, load_task, run_task

MC = [
    {"query": "2 + 2 =", "choices": ["4", "five", "twenty-two"], "gold": 0},
    {"query": "The capital of France is", "choices": ["Paris", "a big dog"], "gold": "Paris"},
    {"query": "def f(): return", "choices": ["None", "1", "lambda x: x"], "gold": 2},
]


@pytest.fixture(scope="module")
def model(model_dir: Path) -> EvalModel:
    return EvalModel.load(model_dir)


def ref_loglikelihood(model: EvalModel, context: str, continuation: str) -> float:
    ctx = [model.prefix_id, *model.encode(context)]
    cont = model.encode(continuation)
    seq = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model.model(torch.tensor([seq[:-1]]))[0], dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_multiple_choice_acc_and_acc_norm_match_reference(model: EvalModel) -> None:
    spec = TaskSpec(name="mc", type="multiple_choice", examples=MC)
    result = run_task(model, spec, GenerationSettings())
    acc, acc_norm = [], []
    for row, rec in zip(MC, result.records, strict=True):
        lls = [ref_loglikelihood(model, row["query"], " " + c) for c in row["choices"]]
        assert rec["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        gold = row["gold"] if isinstance(row["gold"], int) else row["choices"].index(row["gold"])
        acc.append(int(np.argmax(lls)) == gold)
        norm = [ll / len(c.encode()) for ll, c in zip(lls, row["choices"], strict=True)]
        acc_norm.append(int(np.argmax(norm)) == gold)
    assert result.metrics["acc"] == pytest.approx(np.mean(acc))
    assert result.metrics["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert result.metrics["n"] == 3


def test_classification_predicts_argmax_label_and_counts(model: EvalModel) -> None:
    rows = [
        {"text": t, "label": lab}
        for t, lab in [
            ("def f(): pass", "func"),
            ("X = 1", "const"),
            ("class A: pass", "class"),
            ("def g(x): return x", "func"),
        ]
    ]
    spec = TaskSpec(name="cls", type="classification", examples=rows)
    result = run_task(model, spec, GenerationSettings())
    cm, labels = result.confusion
    assert labels == ["class", "const", "func"] and cm.sum() == 4
    for rec in result.records:
        lls = {lab: ref_loglikelihood(model, rec["text"] + "\nLabel:", " " + lab) for lab in labels}
        assert rec["predicted"] == max(lls, key=lls.get)
    correct = sum(r["predicted"] == r["label"] for r in result.records)
    assert result.metrics["accuracy"] == pytest.approx(correct / 4)


def test_generation_is_greedy_and_metrics_follow_outputs(model: EvalModel) -> None:
    rows = [
        {"prompt": "def add(a, b):", "reference": "return a + b"},
        {"prompt": "import", "reference": "os"},
    ]
    settings = GenerationSettings(max_new_tokens=6)
    result = run_task(model, TaskSpec(name="gen", type="generation", examples=rows), settings)
    ids = [model.prefix_id, *model.encode("def add(a, b):")]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model.model(torch.tensor([ids]))[0, -1].argmax()))
    n_prompt = 1 + len(model.encode("def add(a, b):"))
    assert result.records[0]["output"] == model.decode(ids[n_prompt:]).strip()
    from lmforge.evals.metrics import bleu

    outputs = [r["output"] for r in result.records]
    assert result.metrics["bleu"] == pytest.approx(
        bleu(outputs, [r["reference"] for r in rows])["bleu"]
    )
    assert result.metrics["generation"]["max_new_tokens"] == 6
    assert result.metrics["generation"]["temperature"] == 0.0


def one_at_a_time(model: EvalModel, prompt: str, settings: GenerationSettings) -> str:
    """Greedy continuation of one unpadded prompt, no KV cache: the reference for batching."""
    n = settings.max_new_tokens
    ids, new = model.start(prompt)[-(model.block_size - n) :], []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model.model(torch.tensor([ids + new]))[0, -1].argmax()))
            if new[-1] in model.stop_ids():
                break
    return cut_at_stop(model.decode(new), settings.stop)


def test_batched_generation_equals_one_prompt_at_a_time(model: EvalModel) -> None:
    prompts = ["def add(a, b):", "import", "The quick brown fox jumps over the lazy dog", "x"]
    prompts += [" ".join(["def add(a, b): return a + b"] * 30), "print(", "class A:\n    def"]
    settings = GenerationSettings(max_new_tokens=10)
    free = [one_at_a_time(model, p, settings) for p in prompts]
    assert model.generate_batch(prompts, settings, batch_size=3) == free
    stop = next(out[3:5] for out in free if len(out) > 5)  # cuts some rows, maybe not all
    settings = GenerationSettings(max_new_tokens=10, stop=[stop])
    expected = [one_at_a_time(model, p, settings) for p in prompts]
    assert any(len(e) < len(f) for e, f in zip(expected, free, strict=True))
    assert model.generate_batch(prompts, settings, batch_size=4) == expected
    assert [model.generate(p, settings) for p in prompts] == expected
    rows = [{"prompt": p, "reference": "x"} for p in prompts]
    result = run_task(model, TaskSpec(name="gen", type="generation", examples=rows), settings)
    assert [r["output"] for r in result.records] == [e.strip() for e in expected]


def test_task_files_yaml_jsonl_and_dirs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    data = tmp_path / "sub" / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    spec_file = tmp_path / "facts.yaml"
    spec_file.write_text("type: multiple_choice\ndata: sub/facts.jsonl\nmax_examples: 2\n")
    spec = load_task(spec_file)
    assert (spec.name, spec.type, spec.data) == ("facts", "multiple_choice", data.resolve())
    assert load_task(data).type == "multiple_choice"
    gen = tmp_path / "explain.jsonl"
    gen.write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    assert (load_task(gen).name, load_task(gen).type) == ("explain", "generation")
    assert load_task(tmp_path / "sub").type == "perplexity"
    bad = tmp_path / "odd.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(InputError, match="match no task type"):
        load_task(bad)
    with pytest.raises(ConfigError, match="unknown key 'promt'"):
        load_task({"type": "generation", "data": str(gen), "promt": "x"})
    with pytest.raises(InputError, match="no such file"):
        load_task(tmp_path / "missing.yaml")


def test_missing_fields_and_template_errors_name_the_record(model: EvalModel) -> None:
    spec = TaskSpec(
        name="g", type="generation", examples=[{"prompt": "a", "reference": "b"}, {"prompt": "c"}]
    )
    with pytest.raises(InputError, match="record 2: missing field\\(s\\) reference"):
        run_task(model, spec, GenerationSettings())
    spec = TaskSpec(
        name="g",
        type="generation",
        prompt_template="{question}",
        examples=[{"prompt": "a", "reference": "b"}],
    )
    with pytest.raises(ConfigError, match="uses 'question'"):
        run_task(model, spec, GenerationSettings())


def test_fields_map_task_fields_from_other_names_and_a_missing_one_is_an_error(
    model: EvalModel,
) -> None:
    from lmforge.evals.task_format import load_examples

    rows = [{"context": "x = 1", "intent": "code", "text": "not this", "label": "nor this"},
            {"context": "hello", "intent": "chat"}]  # fmt: skip
    spec = TaskSpec(name="c", type="classification", examples=rows,
                    fields={"text": "context", "label": "intent"})  # fmt: skip
    got = load_examples(spec)
    assert [(r["text"], r["label"]) for r in got] == [("x = 1", "code"), ("hello", "chat")]
    # the record's own 'text' is not used when the field 'fields' names is absent
    spec = spec.model_copy(update={"examples": [rows[0], {"text": "t", "label": "l"}]})
    with pytest.raises(InputError, match=r"record 2: no field\(s\) 'context' \(for text\), "
                                         r"'intent' \(for label\).*has label, text"):  # fmt: skip
        load_examples(spec)


def test_classification_uses_the_finetuned_head_when_present(
    model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import save_file

    head_dir = shutil.copytree(model_dir, tmp_path / "classifier")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 3)
    save_file(
        {k: v.contiguous() for k, v in linear.state_dict().items()}, head_dir / "head.safetensors"
    )
    (head_dir / "labels.json").write_text(json.dumps(["class", "const", "func"]))
    model = EvalModel.load(head_dir)
    rows = [{"text": "def f(): pass", "label": "func"}, {"text": "X = 1", "label": "const"}]
    result = run_task(
        model, TaskSpec(name="c", type="classification", examples=rows), GenerationSettings()
    )
    assert result.metrics["classifier"] == "head"
    for row, rec in zip(rows, result.records, strict=True):
        with torch.no_grad():
            h = model.model.hidden_states(torch.tensor([model.encode(row["text"])]))[0, -1]
            want = ["class", "const", "func"][int(linear(h).argmax())]
        assert rec["predicted"] == want
    spec = TaskSpec(name="c", type="classification", examples=rows, classifier="likelihood")
    assert run_task(model, spec, GenerationSettings()).metrics["classifier"] == "likelihood"
    bare = EvalModel.load(model_dir)
    with pytest.raises(
        InputError, match=r"is no sequence classifier .*lmforge finetune --task classify"
    ):
        run_task(bare, spec.model_copy(update={"classifier": "head"}), GenerationSettings())


def test_classification_reads_a_sequence_classifier_checkpoint(
    model_dir: Path, tmp_path: Path
) -> None:
    """The finetune stage's export: score.weight (no bias) + id2label in the model itself."""
    import shutil

    from lmforge.model.convert import ClassifierHead, load_pretrained, save_pretrained

    clf_dir = shutil.copytree(model_dir, tmp_path / "clf")
    weight = torch.randn(3, 64)
    labels = ["class", "const", "func"]
    save_pretrained(load_pretrained(model_dir), clf_dir, classifier=ClassifierHead(weight, labels))
    model = EvalModel.load(clf_dir)
    linear, head_labels = model.head.linear, model.head.labels
    assert head_labels == labels and linear.bias is None and torch.equal(linear.weight, weight)
    rows = [{"text": "def f(): pass", "label": "func"}, {"text": "X = 1", "label": "const"}]
    result = run_task(
        model, TaskSpec(name="c", type="classification", examples=rows), GenerationSettings()
    )
    assert result.metrics["classifier"] == "head"


def test_a_transformers_classifier_evaluates_with_its_own_logits(
    model_dir: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    import shutil

    vocab = EvalModel.load(model_dir).files.vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
        id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        hf.score.weight.normal_(std=0.5)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy2(model_dir / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    model = EvalModel.load(tmp_path / "hf")
    assert model.head.labels == ["no", "yes"]
    text = "def add(a, b): return a + b"
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([model.encode(text)])).logits[0], -1)
    assert np.abs(np.asarray(model.classify(text)) - want.numpy()).max() <= 1e-4


def test_chat_models_get_the_prompt_as_a_user_turn_and_alpaca_records(
    model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    chat_dir = shutil.copytree(model_dir, tmp_path / "chat")
    (chat_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    model = EvalModel.load(chat_dir)
    assert model.render_chat("hi") == "<|bos|>user: hi\nassistant:"
    data = tmp_path / "alpaca.jsonl"
    data.write_text(
        json.dumps({"instruction": "Explain", "input": "len(x)", "output": "length"}) + "\n"
    )
    spec = load_task(data)
    assert spec.type == "generation"
    result = run_task(model, spec, GenerationSettings(max_new_tokens=3))
    assert result.records[0]["prompt"] == "Explain\n\nlen(x)"
    assert result.metrics["generation"]["chat"] is True
    ids = model.encode(model.render_chat("Explain\n\nlen(x)"))
    assert ids[0] == model.bos_id  # the template's special token, not an added prefix
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model.model(torch.tensor([ids]))[0, -1].argmax()))
    n = len(model.encode(model.render_chat("Explain\n\nlen(x)")))
    assert result.records[0]["output"] == model.decode(ids[n:]).strip()


def test_long_context_is_cut_from_the_left_like_lm_eval(model: EvalModel) -> None:
    context = " ".join(["def add(a, b): return a + b"] * 30)
    cont = " The quick brown fox"
    ctx_ids, cont_ids = model.start(context), model.encode(cont)
    assert len(ctx_ids) + len(cont_ids) > model.block_size + 1
    kept = ctx_ids[-(model.block_size + 1 - len(cont_ids)) :]
    seq = kept + cont_ids
    with torch.no_grad():
        logp = torch.log_softmax(model.model(torch.tensor([seq[:-1]]))[0], dim=-1)
    want = sum(logp[len(kept) - 1 + i, t].item() for i, t in enumerate(cont_ids))
    got, _ = model.loglikelihood(context, cont)
    assert got == pytest.approx(want, abs=1e-4)


def test_evaluate_public_api_takes_a_dict_and_reports_bad_keys(
    model_dir: Path, tmp_path: Path
) -> None:
    from lmforge.evals import evaluate

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    out = evaluate({"models": [str(model_dir)], "tasks": [str(data)], "out": str(tmp_path / "ev")})
    report = json.loads((out / "eval.json").read_text())
    assert report["tasks"] == [
        {
            "name": "mc",
            "type": "multiple_choice",
            "main_metric": "acc_norm",
            "higher_is_better": True,
        }
    ]
    with pytest.raises(ConfigError, match="missing required key 'models'"):
        evaluate({"model": [str(model_dir)], "tasks": [str(data)], "out": str(tmp_path / "x")})
