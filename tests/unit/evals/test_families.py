"""Every model family through the evals: BERT-style encoders (pseudo-log-likelihood, their heads,
tagging), BART seq2seq (conditional log-likelihood = transformers' loss, generation, reference
perplexity) and the dialogue model's intent head; unsupported combinations fail clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import InputError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.perplexity import perplexity
from lmforge.evals.stage import evaluate
from lmforge.evals.tasks import TaskSpec, run_task
from lmforge.model.convert import load_pretrained, save_pretrained

from .family_dirs import SEQ2SEQ_IDS, _copy_files, bart_dirs, bert_dirs

transformers = pytest.importorskip("transformers")
TEXTS = ["the capital is paris .", "def f ( ) : return x + 1", "alpha beta gamma delta one two"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return bert_dirs(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return bart_dirs(tmp_path_factory.mktemp("bart"))


def brute_force_pll(model: EvalModel, text: str) -> float:
    """Sum over tokens of log p(token | the rest), one unbatched forward pass per token."""
    ids, _, _ = model.files.encode_input(text)
    total = 0.0
    for i in range(1, len(ids) - 1):  # not [CLS] / [SEP]
        x = torch.tensor([ids])
        x[0, i] = model.files.mask_id
        with torch.no_grad():
            logits = model.model.logits(model.model.hidden_states(x))[0, i]
        total += torch.log_softmax(logits.double(), -1)[ids[i]].item()
    return total


def test_pseudo_log_likelihood_equals_a_brute_force_loop(bert: dict[str, Path]) -> None:
    model = EvalModel.load(bert["mlm"])
    assert (model.scorer.kind, model.scorer.scoring) == ("encoder", "pseudo_log_likelihood")
    result = perplexity(model, TEXTS)
    want = sum(brute_force_pll(model, t) for t in TEXTS)
    assert abs(-result.nll - want) <= 1e-4
    metrics = result.metrics()
    assert "perplexity" not in metrics and metrics["scoring"] == "pseudo_log_likelihood"
    assert metrics["tokens"] == sum(len(model.encode(t)) for t in TEXTS)
    assert math.isclose(metrics["pseudo_perplexity"], math.exp(-want / metrics["tokens"]),
                        rel_tol=1e-6)  # fmt: skip
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert math.isclose(metrics["bits_per_byte"], -want / (math.log(2) * n_bytes), rel_tol=1e-6)
    # the continuation's share of a text's PLL is what loglikelihoods returns
    (ll, _), = model.loglikelihoods("the capital is", [" paris ."])  # fmt: skip
    full = brute_force_pll(model, "the capital is paris .")
    head = model.scorer.masked_scores([(model.encode("the capital is paris ."), [0, 1, 2])])
    assert abs(ll - (full - sum(head[0][0]))) <= 1e-4


@pytest.mark.parametrize(("n", "max_length", "stride"),
                         [(23, 8, 3), (23, 8, 4), (40, 16, 8), (9, 8, 8), (5, 8, 4), (1, 8, 4)])  # fmt: skip
def test_pll_windows_score_every_token_once_with_context_on_both_sides(
    bert: dict[str, Path], n: int, max_length: int, stride: int
) -> None:
    """A masked LM's point is both sides: a scored token has (max_length - stride) // 2 tokens of
    context to its right (and left) unless it is that close to the text's end (start)."""
    scorer = EvalModel.load(bert["mlm"]).scorer
    ids = list(range(100, 100 + n))
    k = (max_length - stride) // 2
    scored = []
    for window, positions in scorer.windows(ids, max_length, stride):
        assert len(window) <= max_length and positions
        for p in positions:
            token = window[p]
            scored.append(token)
            assert len(window) - 1 - p >= min(k, ids[-1] - token), (token, window)
            assert p >= min(k, token - ids[0]), (token, window)
    assert scored == ids


def test_centered_windows_tile_every_length_and_stride() -> None:
    """The same invariants over every small case (empty text, n < window, odd and full strides),
    without a model; a stride outside [1, max_length] is a config error."""
    from lmforge.errors import ConfigError
    from lmforge.evals.pll import centered_windows

    for max_length in range(1, 13):
        for stride in range(1, max_length + 1):
            k = (max_length - stride) // 2
            for n in range(40):
                scored = []
                for begin, lo, hi, end in centered_windows(n, max_length, stride):
                    assert 0 <= begin <= lo < hi <= end <= n and end - begin <= max_length
                    for t in range(lo, hi):
                        assert min(t - begin, end - 1 - t) >= min(k, t, n - 1 - t)
                    scored += range(lo, hi)
                assert scored == list(range(n)), (n, max_length, stride)
    for stride in (0, 9):
        with pytest.raises(ConfigError, match=r"stride must be in \[1, max_length=8\]"):
            list(centered_windows(20, 8, stride))


def test_encoder_stride_past_its_window_names_the_task_and_the_template_cut(
    bert: dict[str, Path],
) -> None:
    """An encoder's window is its context less [CLS]/[SEP]: the error says so, with both lengths."""
    from lmforge.errors import ConfigError

    model = EvalModel.load(bert["mlm"])
    width = model.scorer.width
    spec = TaskSpec(name="pll", type="perplexity", examples=[{"text": TEXTS[0]}],
                    max_length=4096, stride=width + 1)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_task(model, spec, GenerationSettings())
    assert str(err.value) == (
        f"task 'pll': stride {width + 1} is longer than the effective max_length {width} "
        f"(max_length 4096 was capped to {width}, the model's context less the 2 template "
        f"tokens): set stride to {width} or less, or leave it unset (half of max_length)"
    )


def test_encoder_classifier_head_gives_transformers_probabilities(bert: dict[str, Path]) -> None:
    model = EvalModel.load(bert["clf"])
    assert model.head.labels == ["neg", "neu", "pos"] and model.head.reads == "first_token_pooler"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(bert["clf"]).eval()
    for text in TEXTS:
        ids, types, _ = model.files.encode_input(text)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
        want = torch.log_softmax(logits[0], -1).numpy()
        assert np.abs(np.asarray(model.classify(text)) - want).max() <= 1e-4


def test_encoder_classifier_reads_a_pair_as_transformers_tokenizer_pairs_it(
    bert: dict[str, Path],
) -> None:
    model = EvalModel.load(bert["clf"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(bert["clf"]).eval()
    enc = transformers.AutoTokenizer.from_pretrained(bert["clf"])(
        TEXTS[0], TEXTS[1], return_tensors="pt"
    )
    assert enc["token_type_ids"][0, -1] == 1  # the pair's second text is segment 1
    with torch.no_grad():
        want = torch.log_softmax(hf(**enc).logits[0], -1).numpy()
    got = np.asarray(model.classify(TEXTS[0], TEXTS[1]))
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - np.asarray(model.classify(TEXTS[0]))).max() > 1e-4


def test_encoders_through_the_eval_stage(bert: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": t, "label": lab} for t, lab in zip(TEXTS, ["neg", "pos", "neu"], strict=True)]
    mc = [{"query": "the capital is", "choices": ["paris .", "one two"], "gold": 0}]
    bias = [{"text": "he said the capital is paris ."}]
    tasks = [
        {"name": "clf", "type": "classification", "examples": rows},
        {"name": "ppl", "type": "perplexity", "examples": [{"text": t} for t in TEXTS]},
        {"name": "mc", "type": "multiple_choice", "examples": mc},
        {"name": "cf", "type": "counterfactual", "examples": bias, "groups": ["gender"]},
    ]
    out = evaluate({"models": [bert["clf"]], "tasks": tasks[:1], "out": tmp_path / "clf"})
    clf = json.loads((out / "eval.json").read_text())
    assert clf["models"][0]["family"] == "encoder"
    assert clf["results"]["clf"]["clf"]["scoring"] == "head (first_token_pooler)"
    assert (out / "plots" / "confusion_clf_clf.png").is_file()
    out = evaluate({"models": [bert["mlm"]], "tasks": tasks[1:], "out": tmp_path / "mlm"})
    report = json.loads((out / "eval.json").read_text())
    res = report["results"]["mlm"]
    assert res["ppl"]["scoring"] == "pseudo_log_likelihood" and "pseudo_perplexity" in res["ppl"]
    assert res["mc"]["scoring"] == "pseudo_log_likelihood" and res["mc"]["n"] == 1
    assert res["cf"]["scoring"] == "pseudo-log-likelihood per token"
    from lmforge.evals.report_eval import headline_table, story

    assert headline_table(report)[1][1] == "encoder"
    assert headline_table(report)[1][2].endswith("[pseudo_log_likelihood]")
    assert "bits_per_byte" in story(report) and "[pseudo_log_likelihood]" in story(report)


def test_tagging_reports_seqeval_entity_scores_on_a_planted_case(
    bert: dict[str, Path], tmp_path: Path
) -> None:
    """The planted head tags every word B-PER: 4 predicted PER entities, 1 of them right."""
    rows = [{"tokens": ["alpha", "is", "in", "paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}]
    out = evaluate({"models": [bert["tag"]], "out": tmp_path / "ev",
                    "tasks": [{"name": "ner", "type": "tagging", "examples": rows}]})  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    metrics = report["results"]["tag"]["ner"]
    assert report["tasks"][0]["main_metric"] == "entity_f1"
    assert metrics["token_accuracy"] == 0.25
    assert (metrics["entity_precision"], metrics["entity_recall"]) == (0.25, 0.5)
    assert metrics["entity_f1"] == round(2 * 0.25 * 0.5 / 0.75, 4)
    assert metrics["per_type"]["PER"] == {"precision": 0.25, "recall": 1.0, "f1": 0.4,
                                          "support": 1}  # fmt: skip
    assert metrics["per_type"]["LOC"]["f1"] == 0.0 and metrics["per_type"]["LOC"]["support"] == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["errors"] == 3 and errors[0]["predicted"] == ["B-PER"] * 4
    model = EvalModel.load(bert["tag"])
    for bad, match in (
        ([{"tokens": ["a"], "tags": ["B-ORG"]}], r"tags \['B-ORG'\] are not in"),
        ([{"tokens": ["a", 7], "tags": ["O", "O"]}], "'tokens' must be the words"),
    ):
        with pytest.raises(InputError, match="record 1: " + match):
            run_task(model, TaskSpec(name="t", type="tagging", examples=bad), GenerationSettings())


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_seq2seq_loglikelihood_equals_transformers_loss(bart: dict[str, Path], name: str) -> None:
    """log p(continuation + eos | context) = -(transformers' mean loss) * label count."""
    model = EvalModel.load(bart[name])
    assert (model.scorer.kind, model.scorer.scoring) == ("seq2seq", "conditional")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(bart[name]).eval()
    eos = SEQ2SEQ_IDS["eos_token_id"]
    context, conts = "What is the capital of France?", ["The capital is Paris.", "x", ""]
    got = model.loglikelihoods(context, conts)
    for cont, (ll, _) in zip(conts, got, strict=True):
        labels = torch.tensor([[*model.encode(cont), eos]])
        with torch.no_grad():
            loss = hf(input_ids=torch.tensor([[*model.encode(context), eos]]), labels=labels).loss
        assert abs(ll - (-loss.item() * labels.size(1))) <= 1e-4


def test_causal_generation_tasks_report_reference_perplexity(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    rows = [{"prompt": "def add(a, b):", "reference": "return a + b"},
            {"prompt": "The quick brown", "reference": "fox jumps"}]  # fmt: skip
    spec = TaskSpec(name="g", type="generation", examples=rows, chat=False)
    metrics = run_task(model, spec, GenerationSettings(max_new_tokens=3)).metrics
    lls = [model.loglikelihood(r["prompt"], r["reference"])[0] for r in rows]
    n = sum(len(model.encode(r["reference"])) for r in rows)
    assert metrics["reference_scoring"] == "causal"
    assert math.isclose(metrics["reference_perplexity"], math.exp(-sum(lls) / n), rel_tol=1e-6)


def test_causal_reference_scores_batch_the_prompts(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference scores of many prompts take one forward pass per SCORE_BATCH rows, and equal
    one prompt at a time."""
    from lmforge.evals.scoring import SCORE_BATCH

    model = EvalModel.load(model_dir)
    prompts = [f"def f{i}(x):" for i in range(SCORE_BATCH + 3)]
    refs = ["" if i == 0 else f"return x + {i}" for i in range(len(prompts))]  # one empty
    one_by_one = [model.scorer.reference_scores([p], [r], False)[0]
                  for p, r in zip(prompts, refs, strict=True)]  # fmt: skip
    calls, forward = [], model.model.hidden_states
    monkeypatch.setattr(model.model, "hidden_states", lambda x: calls.append(x) or forward(x))
    batched = model.scorer.reference_scores(prompts, refs, False)
    assert len(calls) == 2
    assert [g for _, g in batched] == [g for _, g in one_by_one]
    for (got, _), (want, _) in zip(batched, one_by_one, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert batched[0] == ([], True)


def test_seq2seq_through_the_eval_stage(bart: dict[str, Path], tmp_path: Path) -> None:
    gen = [{"prompt": "What is the capital of France?", "reference": "The capital is Paris."},
           {"prompt": "def f(x): return x + 1", "reference": "Return the absolute value."}]  # fmt: skip
    tasks = [
        {"name": "gen", "type": "generation", "examples": gen},
        {"name": "mc", "type": "multiple_choice", "target_delimiter": "",
         "examples": [{"query": "the capital", "choices": ["Paris.", "def f"], "gold": 0}]},
        {"name": "clf", "type": "classification", "target_delimiter": "", "examples": [
            {"text": "capital of France", "label": "geo"}, {"text": "def f(x)", "label": "code"}]},
        {"name": "cf", "type": "counterfactual", "groups": ["gender"],
         "examples": [{"text": "he asked what the capital is"}]},
    ]  # fmt: skip
    out = evaluate({"models": [bart["bart"]], "tasks": tasks, "out": tmp_path / "ev",
                    "generation": {"max_new_tokens": 5}})  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    res = report["results"]["bart"]
    model = EvalModel.load(bart["bart"])
    lls = [model.loglikelihood(g["prompt"], g["reference"])[0] for g in gen]
    n = sum(len(model.encode(g["reference"])) + 1 for g in gen)  # + eos each
    assert math.isclose(res["gen"]["reference_perplexity"], math.exp(-sum(lls) / n), rel_tol=1e-6)
    assert res["gen"]["reference_scoring"] == "conditional" and res["gen"]["n"] == 2
    assert res["mc"]["scoring"] == "conditional" and res["clf"]["classifier"] == "likelihood"
    assert res["cf"]["scoring"] == "log-likelihood per token (decoder, empty source)"
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all("reference_nll_per_token" in r for r in rows)


def test_seq2seq_sampling_is_seeded_and_cut_at_stop_strings(bart: dict[str, Path]) -> None:
    model = EvalModel.load(bart["bart"])
    prompts = ["What is the capital of France?", "def f(x): return x + 1"]
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    once = model.generate_batch(prompts, sampled, batch_size=1)
    assert model.generate_batch(prompts, sampled, batch_size=2) == once
    text = once[0]
    assert len(text) > 2  # this seed draws text before eos
    stop = sampled.model_copy(update={"stop": [text[1:3]]})
    assert model.generate(prompts[0], stop) == text[: text.find(text[1:3])]


def test_dialogue_intent_head_is_a_classification_head(bart: dict[str, Path]) -> None:
    from lmforge.finetune.dialogue import DialogueModel, load_intent_head

    model = EvalModel.load(bart["dialogue"])
    assert model.head.labels == ["ask", "thank"] and model.head.reads == "mean_source"
    head, _ = load_intent_head(bart["dialogue"])
    dialogue = DialogueModel(model.model, 2).eval()
    dialogue.intent_head.load_state_dict(head.state_dict())
    rows = [{"text": "What is the capital?", "label": "ask"}, {"text": "thanks!", "label": "thank"}]
    for row in rows:
        src = torch.tensor([[*model.encode(row["text"]), SEQ2SEQ_IDS["eos_token_id"]]])
        mask = torch.ones_like(src)
        with torch.no_grad():
            want = torch.log_softmax(
                dialogue.intent_logits(model.model.encode(src, mask), mask), -1
            )
        assert np.abs(np.asarray(model.classify(row["text"])) - want[0].numpy()).max() <= 1e-5
    spec = TaskSpec(name="intent", type="classification", classifier="head", examples=rows)
    result = run_task(model, spec, GenerationSettings())
    assert result.metrics["scoring"] == "head (mean_source)" and result.metrics["n"] == 2
    pairs = [{**rows[0], "text_pair": "and the river?"}]
    with pytest.raises(InputError, match=r"intent head reads one dialogue text, not a pair"):
        run_task(model, TaskSpec(name="intent", type="classification", examples=pairs),
                 GenerationSettings())  # fmt: skip


def test_unsupported_combinations_say_what_to_do(
    bert: dict[str, Path], bart: dict[str, Path]
) -> None:
    settings = GenerationSettings(max_new_tokens=2)
    with pytest.raises(InputError, match=r"does not generate.*classification"):
        EvalModel.load(bert["mlm"]).generate("the capital", settings)
    with pytest.raises(InputError, match=r"encoder-decoder.*reference_perplexity"):
        perplexity(EvalModel.load(bart["bart"]), ["some text"])
    with pytest.raises(InputError, match=r"without a masked-LM head.*classifier: head"):
        EvalModel.load(bert["clf"]).loglikelihoods("the capital", [" paris"])
    with pytest.raises(InputError, match=r"no token-classification head.*--task tag"):
        run_task(EvalModel.load(bert["mlm"]),
                 TaskSpec(name="t", type="tagging", examples=[{"tokens": ["a"], "tags": ["O"]}]),
                 settings)  # fmt: skip
    with pytest.raises(InputError, match="no classification head"):
        EvalModel.load(bert["mlm"]).classify("the capital")


def test_the_harness_refuses_a_rolling_loglikelihood_that_is_not_causal(
    bert: dict[str, Path],
) -> None:
    pytest.importorskip("lm_eval", reason="lm_eval not installed: pip install 'lmforge[eval]'")
    from types import SimpleNamespace

    from lmforge.evals.harness import LmforgeLM

    lm = LmforgeLM(str(bert["mlm"]))
    with pytest.raises(InputError, match="scores by pseudo_log_likelihood"):
        lm.loglikelihood_rolling([SimpleNamespace(args=("the capital is paris .",))])


def test_seq2seq_beam_generation_equals_transformers(bart: dict[str, Path], tmp_path) -> None:
    peaked = load_pretrained(bart["bart"])  # the fixture's small weights answer eos at once
    with torch.no_grad():
        for p in peaked.parameters():
            p.mul_(8.0)
    save_pretrained(peaked, tmp_path, extra_config=SEQ2SEQ_IDS, generation_config=SEQ2SEQ_IDS)
    model = EvalModel.load(_copy_files(bart["tok"], tmp_path))
    prompts = ["What is the capital of France?", "def f(x): return x + 1"]
    beams = GenerationSettings(max_new_tokens=8, num_beams=3, length_penalty=0.5)
    texts = model.generate_batch(prompts, beams)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    for prompt, text in zip(prompts, texts, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([model.scorer.source(prompt)]), do_sample=False, num_beams=3,
                length_penalty=0.5, max_new_tokens=8,
            )[0, 1:].tolist()  # fmt: skip
        assert text == model.decode([t for t in out if t not in model.stop_ids()])
    assert all(texts) and texts != model.generate_batch(
        prompts, GenerationSettings(max_new_tokens=8)
    )
