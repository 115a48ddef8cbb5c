"""Align trains a served tool conversation as it was served: the feedback store's row (two
parallel calls, results sent out of order) exported to preferences.jsonl and kto.jsonl keeps
OpenAI's form and its tools, and DPO's and KTO's rows put the reply after the prompt ids
transformers' apply_chat_template(messages, tools=..., add_generation_prompt=True) gives, for a
template that reads tools; for ChatML, after the Hermes turns as before."""

import json
from types import SimpleNamespace

import pytest
import torch

from lmforge.align.config import AlignConfig, PPOOptions, RewardSpec
from lmforge.align.encode import encode_pairs
from lmforge.align.grpo import sample_and_score
from lmforge.align.grpo_data import load_prompt_records
from lmforge.align.kto import encode_unpaired
from lmforge.align.ppo import PolicyWithValue, Rollouts, make_rollout, score
from lmforge.align.prefs import load_pairs, pairs_of
from lmforge.align.reward import reward_model
from lmforge.align.rewards import Answers, RewardFn, _reward_model, build_rewards
from lmforge.align.rollout import answer_texts, sample_answers
from lmforge.align.rouge import rouge_examples
from lmforge.align.unpaired import load_unpaired_groups
from lmforge.common.io import read_jsonl
from lmforge.errors import InputError
from lmforge.finetune.evaluate import answer_prompt
from lmforge.model.convert import load_pretrained
from lmforge.model.transformer import IGNORE_INDEX
from lmforge.serve.feedback import FeedbackStore
from lmforge.serve.feedback_export import FeedbackExportConfig, export_feedback
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.hermes_tools import hermes_messages
from unit.finetune.helpers import make_model_dir
from unit.finetune.test_sft import ASK, CALLS, RESULTS, SERVED, TOOLS, TOOLS_TEMPLATE, tools_model

STORED = [*ASK, {"role": "assistant", "content": "", "tool_calls": CALLS}, *RESULTS[::-1]]
GOOD, BAD = "12:00, rain.", "I cannot tell."
STRAY = {"role": "tool", "tool_call_id": "zz", "content": "1"}  # a result answering no call


@pytest.fixture
def export(tmp_path):
    """The export of a store holding one tool conversation answered twice, rated 5 and 1."""
    params = {"tools": TOOLS, "tool_choice": "auto", "finish_reason": "stop",
              "messages_form": "openai"}  # fmt: skip
    db = tmp_path / "f.db"
    with FeedbackStore(db) as store:
        store.record_response("good", "m", "p", STORED, GOOD, params)
        store.record_response("bad", "m", "p", STORED, BAD, params)
        store.add_rating("good", 5)
        store.add_rating("bad", 1, scale="stars")
    return export_feedback(FeedbackExportConfig(db=db, out=tmp_path / "export"))


def test_exported_pairs_and_kto_records_keep_the_openai_form_and_tools(export):
    (pair,) = read_jsonl(export / "preferences.jsonl")
    kto = list(read_jsonl(export / "kto.jsonl"))
    assert (pair["chosen"], pair["rejected"]) == (GOOD, BAD) and len(kto) == 2
    for record in (pair, *kto):
        assert record["prompt"] == SERVED[:-1] and record["tools"] == TOOLS  # calls parsed, ordered


def _reply_after(rows_ids, rows_labels, prompt_ids):
    """The reply tokens of one row, checked to follow exactly prompt_ids."""
    n = len(prompt_ids)
    assert rows_ids[:n].tolist() == prompt_ids
    assert (rows_labels[: n - 1] == IGNORE_INDEX).all() and rows_labels[n - 1] != IGNORE_INDEX
    return [t for t in rows_labels.tolist() if t != IGNORE_INDEX]


@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, CHATML_TEMPLATE], ids=["tools", "chatml"])
def test_dpo_and_kto_rows_prompt_the_reply_as_it_was_served(
    export, tokenizer_dir, tmp_path, template
):
    tok, hf = tools_model(tokenizer_dir, tmp_path, template)
    if template == TOOLS_TEMPLATE:  # the served prompt: the template renders calls and tools
        served = hf.apply_chat_template(
            SERVED[:-1], tools=TOOLS, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    else:  # a template without tools: the Hermes turns the server renders
        hermes = hermes_messages(STORED, TOOLS)
        served = hf.apply_chat_template(hermes, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    assert list(served) == tok.encode_chat(SERVED[:-1], True, tools=TOOLS).ids  # (serve's path)

    for source in (export, export.parent / "f.db"):  # the export, or the store itself
        rows, stats, _ = encode_pairs(tok, load_pairs(source), seq_len=1024)
        assert stats["pairs"] == 1 and stats["truncated"] == 0
        for side, reply in enumerate((GOOD, BAD)):
            got = _reply_after(rows["input_ids"][0, side], rows["labels"][0, side], list(served))
            assert hf.decode(got) == reply + "<|im_end|>"

    examples = [e for group in load_unpaired_groups(export) for e in group]
    rows, counts = encode_unpaired(tok, examples, seq_len=1024, seed=0)
    assert (counts["desirable"], counts["undesirable"]) == (1, 1)
    for r in range(2):
        own = _reply_after(rows["input_ids"][r, 0], rows["labels"][r, 0], list(served))
        partner = _reply_after(rows["input_ids"][r, 1], rows["labels"][r, 1], list(served))
        assert {hf.decode(own), hf.decode(partner)} == {GOOD + "<|im_end|>", BAD + "<|im_end|>"}


@pytest.mark.parametrize(
    ("prompt", "tools", "message"),
    [
        ([*STORED[:2], {**STORED[2], "content": 3}], TOOLS, "string content"),
        (STORED, {"name": "f"}, "tools must be a list"),
        ([*STORED[:2], STRAY], TOOLS, "a tool result must follow the assistant message"),
        ([*STORED[:3], STRAY], TOOLS, "tool_call_id 'zz'"),
    ],
)
def test_a_bad_tool_prompt_names_file_and_line(tmp_path, prompt, tools, message):
    path = tmp_path / "prefs.jsonl"
    record = {"prompt": prompt, "tools": tools, "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps(record) + "\n")  # fmt: skip
    with pytest.raises(InputError, match=f"prefs.jsonl line 2: .*{message}"):
        load_pairs(path)


def test_a_text_prompt_with_tools_keeps_them(tokenizer_dir, tmp_path):
    tok, hf = tools_model(tokenizer_dir, tmp_path, TOOLS_TEMPLATE)
    (pair,) = pairs_of({"prompt": "Time?", "tools": TOOLS, "chosen": GOOD, "rejected": BAD})
    user = [{"role": "user", "content": "Time?"}]
    assert pair["tool_conversation"] == {"messages": user, "tools": TOOLS}
    assert pair["prompt"] == hermes_messages(user, TOOLS)
    served = hf.apply_chat_template(user, tools=TOOLS, add_generation_prompt=True, return_dict=True)
    rows, _, _ = encode_pairs(tok, [pair], seq_len=512)
    got = _reply_after(rows["input_ids"][0, 0], rows["labels"][0, 0], list(served["input_ids"]))
    assert hf.decode(got) == GOOD + "<|im_end|>"


@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, CHATML_TEMPLATE], ids=["tools", "chatml"])
def test_held_out_rouge_prompts_a_tool_record_with_the_training_prompt_ids(
    export, tokenizer_dir, tmp_path, template
):
    tok, _ = tools_model(tokenizer_dir, tmp_path, template)
    cfg = AlignConfig(method="dpo", model=tmp_path, data=export, out=tmp_path / "out")
    pairs = load_pairs(export)
    examples = [e for e in load_unpaired_groups(export)[0] if e["desirable"]]
    rows, _, _ = encode_pairs(tok, pairs, seq_len=1024)
    start = int((rows["labels"][0, 0] != IGNORE_INDEX).argmax()) + 1  # the reply's first token
    trained = rows["input_ids"][0, 0, :start].tolist()
    for rouge in (rouge_examples(cfg, pairs), rouge_examples(cfg, examples, "completion")):
        (example,) = rouge  # DPO's from pairs, KTO's from desirable examples
        assert tok.encode(answer_prompt(tok, example)) == trained
        assert [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"] == GOOD


@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, CHATML_TEMPLATE], ids=["tools", "chatml"])
def test_ppo_and_grpo_sample_after_the_prompt_ids_dpo_trains_on(
    export, tokenizer_dir, tmp_path, template
):
    tok, _ = tools_model(tokenizer_dir, tmp_path, template)
    (record,) = load_prompt_records(export)  # PPO's and GRPO's reader
    rows, _, _ = encode_pairs(tok, load_pairs(export), seq_len=1024)
    start = int((rows["labels"][0, 0] != IGNORE_INDEX).argmax()) + 1
    trained = rows["input_ids"][0, 0, :start].tolist()
    lm = load_pretrained(make_model_dir(tmp_path / "lm", tokenizer_dir, block_size=start + 8))
    ids, answers = sample_answers(lm, tok, [record], max_new_tokens=4, seed=0, temperature=1.0)
    assert ids == [trained] and 1 <= len(answers[0]) <= 4


def test_reward_models_and_python_rewards_read_a_tool_record_as_its_pairs_and_data_hold_it(
    export, tokenizer_dir, tmp_path
):
    """The reward model scores a tool answer on the ids its pairs were trained on (the
    template's, which reads tools, not the Hermes turns), in GRPO as in PPO's rollouts; a
    python reward gets the prompt as the record wrote it (OpenAI's form, as TRL passes it)."""
    tok, _ = tools_model(tokenizer_dir, tmp_path, TOOLS_TEMPLATE)
    (record,) = load_prompt_records(export)
    rows, _, _ = encode_pairs(tok, load_pairs(export), seq_len=1024)
    n = int(rows["last"][0, 0]) + 1  # the chosen row's tokens, pooled at its last
    model_dir = make_model_dir(tmp_path / "lm", tokenizer_dir, block_size=1024)
    rm = reward_model(load_pretrained(model_dir)).eval()
    rm.input_len = None
    with torch.no_grad():
        trained = rm(torch.as_tensor(rows["input_ids"][0, :1, :n]), torch.tensor([n - 1]))[0]
    tooled = Answers([record.prompt], [GOOD], [None], [1], [None], [record.tool_conversation])
    assert torch.allclose(_reward_model(rm, tok, 1024)(tooled), trained.view(1), atol=1e-5)
    assert not torch.allclose(score(rm, tok, [record.prompt], [GOOD], 1024), trained.view(1))

    user = tmp_path / "seen.py"
    user.write_text("import json, pathlib\n\ndef f(prompts, answers, references):\n"
                    "    seen = pathlib.Path(__file__).with_suffix('.json')\n"
                    "    seen.write_text(json.dumps([prompts, answers]))\n"
                    "    return [0.0] * len(answers)\n")  # fmt: skip
    (python,) = build_rewards([RewardSpec(kind="python", function=f"{user}:f")], tok, 0, 0)
    fns = [python, RewardFn("rm", 1.0, False, _reward_model(rm, tok, 1024), rm)]
    opts = SimpleNamespace(max_new_tokens=4, temperature=1.0)
    *_, each = sample_and_score(load_pretrained(model_dir), tok, fns, [record], opts, seed=0)
    prompts, answers = json.loads(user.with_suffix(".json").read_text())
    assert prompts == [SERVED[:-1]]  # the calls and results as OpenAI's messages
    tc = [record.tool_conversation]
    assert torch.allclose(each["rm"], score(rm, tok, [record.prompt], answers, 1024, tc))

    policy = PolicyWithValue(load_pretrained(model_dir))  # PPO's rollout scores it so too
    opts = PPOOptions(rollout_prompts=1, max_new_tokens=4)
    r = make_rollout(Rollouts(policy, policy.lm, rm, tok, [record], opts, 1, 1024, 0), [record], 0)
    answer = answer_texts(tok, [r["labels"][0][r["labels"][0] != IGNORE_INDEX].tolist()])
    assert torch.allclose(r["score"], score(rm, tok, [record.prompt], answer, 1024, tc))
