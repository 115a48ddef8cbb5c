"""Built-in dialogues (splits, planted PII, parsing) and the multi-task model's pieces."""

from __future__ import annotations

import re

import pytest
import torch

from lmforge.errors import InputError
from lmforge.finetune.dialogue import (
    DialogueModel,
    load_intent_head,
    make_loss,
    per_intent_scores,
    save_intent_head,
    trim,
)
from lmforge.finetune.dialogue_data import (
    DialoguesConfig,
    dialogue_text,
    make_dialogues,
    parse_dialogue,
)
from lmforge.finetune.dialogue_retrieval import recall_at_k
from lmforge.finetune.small_talk import SMALL_TALK, surface_forms


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    cfg = DialoguesConfig(out=tmp_path_factory.mktemp("d"), max_functions=120, pii_fraction=0.3)
    return cfg, *make_dialogues(cfg)


def test_deterministic_with_every_intent(dialogues):
    cfg, splits, planted = dialogues
    again, planted_again = make_dialogues(cfg)
    assert again == splits and planted_again == planted
    intents = {r["intent"] for rows in splits.values() for r in rows}
    assert intents == {"ask_usage", "ask_signature", "ask_module", "greeting", "goodbye",
                       "out_of_scope"}  # fmt: skip


def test_held_out_dialogues_ask_about_unseen_functions(dialogues):
    _, splits, _ = dialogues

    def functions(rows):  # ask_signature answers start with the qualified name
        return {r["response"].split("(")[0] for r in rows if r["intent"] == "ask_signature"}

    train = functions(splits["train"])
    assert train and functions(splits["test"]) and not train & functions(splits["test"])
    assert not train & functions(splits["val"])
    for r in splits["test"]:  # each question names the function recall is scored against
        if r["intent"] == "ask_signature":
            assert r["response"].startswith(r["function"] + "(")
        elif r["intent"] in ("greeting", "goodbye", "out_of_scope"):
            assert r["function"] is None


def test_planted_pii_is_counted(dialogues):
    _, splits, planted = dialogues
    contexts = [r["context"] for rows in splits.values() for r in rows]
    emails = sum(len(re.findall(r"@example\.com", c)) for c in contexts)
    phones = sum(len(re.findall(r"\+1 555-\d{3}-\d{4}", c)) for c in contexts)
    assert planted["email"] == emails > 0 and planted["phone"] == phones > 0
    assert planted["names"] == sum(c.startswith("I am ") for c in contexts)


def _small_talk_by_split(splits) -> dict[str, set[str]]:
    """Small-talk user turns per split, planted PII ("I am <name> (<contact>). ") cut off."""
    return {s: {re.sub(r"^I am [^)]*\)\. ", "", r["context"]) for r in rows
                if r["function"] is None} for s, rows in splits.items()}  # fmt: skip


def test_held_out_small_talk_is_phrased_unlike_any_training_turn(dialogues):
    cfg, splits, _ = dialogues
    turns = _small_talk_by_split(splits)
    assert not turns["test"] & turns["train"] and not turns["val"] & turns["train"]
    for intent, talk in SMALL_TALK.items():
        held_out = 0
        for body in talk.bodies:  # every form of one core phrasing is in one split
            forms = set(surface_forms(intent, body, cfg.small_talk_forms, cfg.seed))
            assert len(forms) == cfg.small_talk_forms
            homes = {s for s, seen in turns.items() if forms & seen}
            assert len(homes) == 1 and forms <= turns[homes.pop()], body
            held_out += bool(forms & turns["test"])
        assert held_out >= 1, intent
    intents = {r["intent"] for r in splits["test"] if r["function"] is None}
    assert intents == {"greeting", "goodbye", "out_of_scope"}
    assert len(turns["train"]) >= 500  # many phrasings to learn from, not ~9 an intent


def test_every_training_small_talk_phrasing_is_also_said_after_a_self_introduction(dialogues):
    cfg, splits, planted = dialogues
    bare, _ = make_dialogues(cfg.model_copy(update={"small_talk_pii_copies": 0}))
    assert bare["val"] == splits["val"] and bare["test"] == splits["test"]
    n_bare = len(bare["train"])
    assert splits["train"][:n_bare] == bare["train"]  # the copies come after, the rest as it was
    copies = splits["train"][n_bare:]
    plain = {(r["context"], r["response"]) for r in bare["train"] if r["function"] is None}
    for copy in copies:  # a plain training turn, introduced, with that turn's answer
        assert copy["function"] is None and copy["context"].startswith("I am ")
        assert (re.sub(r"^I am [^)]*\)\. ", "", copy["context"]), copy["response"]) in plain
    phrasings = {
        (intent, body)
        for intent, talk in SMALL_TALK.items()
        for body in talk.bodies
        if set(surface_forms(intent, body, cfg.small_talk_forms, cfg.seed)) & {c for c, _ in plain}
    }
    introduced = _small_talk_by_split({"train": [r for r in splits["train"]
                                                 if r["context"].startswith("I am ")]})["train"]  # fmt: skip
    for intent, body in phrasings:  # each one after a self-introduction at least once
        forms = set(surface_forms(intent, body, cfg.small_talk_forms, cfg.seed))
        assert forms & introduced, body
    assert len(copies) == len(phrasings) * cfg.small_talk_pii_copies > 0
    assert planted["names"] == sum(r["context"].startswith("I am ") for rows in splits.values()
                                   for r in rows)  # fmt: skip


def test_small_talk_forms_are_natural_variants_of_their_phrasing():
    forms = surface_forms("out_of_scope", "what is the weather in Paris?", 40, seed=3)
    assert forms == surface_forms("out_of_scope", "what is the weather in Paris?", 40, seed=3)
    assert forms != surface_forms("out_of_scope", "what is the weather in Paris?", 40, seed=4)
    assert len(set(forms)) == 40
    assert all("weather in paris" in f.lower() and "?" in f for f in forms)  # still a question
    greetings = surface_forms("greeting", "good morning", 200, seed=0)
    assert "Good morning!" in greetings and "oh, good morning. I have a question." in greetings
    assert all(not f.endswith("?") for f in greetings)
    assert any(f.startswith("Good") for f in greetings) and any(f == f.lower() for f in greetings)


def test_parse_round_trip_and_clear_error():
    row = {"text": dialogue_text("hi <EMAIL>", "Hello!"), "intent": "greeting",
           "dialogue_split": "val", "id": "d:3"}  # fmt: skip
    assert parse_dialogue(row, "x") == {"context": "hi <EMAIL>", "response": "Hello!",
                                        "intent": "greeting", "split": "val",
                                        "function": None}  # fmt: skip
    with pytest.raises(InputError, match=r"data/train.jsonl.zst: row d:4 is not a dialogue"):
        parse_dialogue({"text": "plain text", "id": "d:4"}, "data/train.jsonl.zst")


def _model() -> DialogueModel:
    from lmforge.model.config import preset_config
    from lmforge.model.seq2seq import Seq2SeqLM

    torch.manual_seed(0)
    return DialogueModel(Seq2SeqLM(preset_config("bart-micro", vocab_size=64)), 3)


def test_multitask_loss_trains_both_heads():
    model = _model()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 64, (6, 7), generator=g),
             "attention_mask": torch.ones(6, 7, dtype=torch.long),
             "decoder_input_ids": torch.randint(0, 64, (6, 5), generator=g),
             "labels": torch.randint(0, 64, (6, 5), generator=g),
             "intent": torch.tensor([0, 1, 2, 0, 1, 2])}  # fmt: skip
    batch["attention_mask"][0, 4:] = 0
    loss_fn = make_loss(0.5)
    loss, extra = loss_fn(model, batch)
    assert loss.item() == pytest.approx(
        float(extra["response_nll"]) + 0.5 * float(extra["intent_ce"]), rel=1e-5
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        loss_fn(model, batch)[0].backward()
        opt.step()
    _, after = loss_fn(model, batch)
    assert float(after["response_nll"]) < float(extra["response_nll"]) - 0.5
    assert float(after["intent_ce"]) < float(extra["intent_ce"]) - 0.3


def test_intent_head_saved_and_read_back(tmp_path):
    model = _model()
    save_intent_head(model, ["a", "b", "c"], tmp_path)
    head, labels = load_intent_head(tmp_path)
    x = torch.randn(4, model.seq2seq.config.n_embd)
    assert labels == ["a", "b", "c"]
    torch.testing.assert_close(head(x), model.intent_head(x))
    with pytest.raises(Exception, match="intent_head"):
        load_intent_head(tmp_path / "missing")


def test_recall_and_per_intent_scores():
    rows = [{"intent": "ask_usage", "function": "os.path.join"},
            {"intent": "ask_usage", "function": "json.dumps"},
            {"intent": "ask_module", "function": "json.loads"},
            {"intent": "greeting", "function": None}]  # fmt: skip
    found = [["os.path.join", "os.sep"], ["json.loads"], ["json.loads"], ["os.path.join"]]
    assert recall_at_k(rows, found) == {"all": round(2 / 3, 4), "ask_module": 1.0,
                                        "ask_usage": 0.5}  # fmt: skip
    hello = "Hello! Ask me about a Python function or module."
    samples = [{"intent": "greeting", "prediction": hello, "reference": hello},
               {"intent": "ask_usage", "prediction": "Use os.path.join.",
                "reference": "Use os.path.join. Join paths."},
               {"intent": "ask_usage", "prediction": "no", "reference": "Use json.dumps."}]  # fmt: skip
    scores = per_intent_scores(samples)
    assert scores["greeting"] == {"rougeL": 1.0, "bleu": pytest.approx(100.0), "exact_match": 1.0,
                                  "n": 1}  # fmt: skip
    assert scores["ask_usage"]["n"] == 2 and scores["ask_usage"]["exact_match"] == 0.0
    assert 0 < scores["ask_usage"]["rougeL"] < 1


def test_trim_cuts_a_batch_to_its_longest_source_and_target():
    ids = torch.arange(12).reshape(2, 6)
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0],
                                                                [1, 1, 0, 0, 0, 0]]),
             "decoder_input_ids": ids, "labels": torch.tensor([[5, -100, -100, -100, -100, -100],
                                                               [5, 6, 7, 8, -100, -100]]),
             "intent": torch.tensor([0, 1])}  # fmt: skip
    out = trim(batch)
    assert out["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert out["attention_mask"].shape == (2, 3) and out["labels"].shape == (2, 4)
    assert out["decoder_input_ids"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert out["intent"].tolist() == [0, 1]


def test_training_sources_leave_pii_placeholders_out_of_retrieval(tmp_path):
    """The dialogues' anonymized turns ("I am <NAME> (<EMAIL>)") find the passages of the user's
    own words, as the server's search does, not ones about names and emails."""
    from lmforge.finetune.dialogue_retrieval import Retrieved
    from lmforge.serve.retrieval import KnowledgeBase
    from lmforge.serve.retrieval_spec import RetrievalSpec

    class Words:  # one token per word
        def encode(self, text: str) -> list[str]:
            return text.split()

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/json.loads.txt").write_text("json.loads parses a JSON document.")
    (tmp_path / "docs/email.policy.txt").write_text("How email handles a name and a phone.")
    kb = KnowledgeBase.build(tmp_path / "docs", tmp_path / "kb.db")
    asked = "I am <NAME> (<EMAIL>). How do I parse JSON?"
    rows = [{"context": asked}, {"context": "How do I parse JSON?"}, {"context": "<NAME> <PHONE>"}]
    got = Retrieved(rows, Words(), RetrievalSpec(passages=2, source_tokens=40), kb)
    kb.close()
    assert got.found == [["json.loads.txt"], ["json.loads.txt"], []]
    assert got.sources == [f"{asked}\n[1] json.loads parses a JSON document.",
                           "How do I parse JSON?\n[1] json.loads parses a JSON document.",
                           "<NAME> <PHONE>"]  # fmt: skip


def test_eval_batch_size_changes_neither_intents_nor_the_config_hash(tmp_path):
    import numpy as np

    from lmforge.config import config_hash
    from lmforge.finetune.dialogue import DialogueConfig, predict_intents

    class Rows:  # Encoded's interface: padded rows of different lengths
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(2)
            self.ids = torch.randint(3, 64, (7, 9), generator=g)
            self.mask = torch.ones(7, 9, dtype=torch.long)
            for i, n in enumerate([9, 4, 6, 9, 2, 5, 8]):
                self.mask[i, n:] = 0

        def __len__(self) -> int:
            return 7

        def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
            keep = int(self.mask[idx].sum(1).max())
            return {"input_ids": self.ids[idx, :keep], "attention_mask": self.mask[idx, :keep]}

    model = _model()
    assert (predict_intents(model, Rows(), 1) == predict_intents(model, Rows(), 32)).all()
    cfg = DialogueConfig(out=tmp_path / "o", data=tmp_path / "d", tokenizer=tmp_path / "t")
    wider = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 4})})
    assert config_hash(wider) == config_hash(cfg)
