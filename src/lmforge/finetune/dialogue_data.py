"""Built-in dialogue data (stage kind "dialogues"): user turns about the stdlib, with intents.

Made from the same documented stdlib functions as builtin_tasks (no download), deterministically:

- ask_usage: "How do I join two or more pathname components?" -> "Use os.path.join. <summary>"
- ask_signature: "What arguments does os.path.join take?" -> "os.path.join(a, *p)"
- ask_module: "Which module is join in?" -> "join is in the os.path module (os.path.join)."
- greeting / goodbye / out_of_scope: many phrasings (finetune.small_talk: core phrasings x
  openers x closers x punctuation x casing) with fixed answers.

Some user turns carry planted PII (an email address and/or a phone number, with a person's name)
so the data stage's PII step has something to anonymize; stats.json counts what was planted.
Training small talk also gets small_talk_pii_copies of each core phrasing with such a prefix
(beside the plain turn), so a self-introduction before small talk is no sign of a question.
The name is found only with data.pii.names on (the dialogue-assistant recipe turns it on).
Splits go by a stable hash of the function (or of the core phrasing for the small-talk intents), so
a held-out dialogue asks about a function, or says a small-talk phrasing, never seen in training.
One row per dialogue in dialogues.jsonl: text ("User: ...\\nAssistant: ..." so the data stage
cleans, anonymizes and tokenizes both turns), intent, split and function (the qualified name a
question asks about, which retrieval recall is scored against; null for small talk);
{split}.jsonl hold {context, response, intent, function}.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from pydantic import Field

from lmforge.artifacts import StageContext
from lmforge.common.io import write_jsonl
from lmforge.config import STDLIB_DOCS_VERSIONS, StageConfig
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.builtin_tasks import SPLITS, split_of, stdlib_functions, summary
from lmforge.finetune.small_talk import small_talk_turns

FUNCTION_INTENTS = ("ask_usage", "ask_signature", "ask_module")
INTENTS = (*FUNCTION_INTENTS, "greeting", "goodbye", "out_of_scope")
USER, ASSISTANT = "User: ", "\nAssistant: "

_USAGE = ("How do I {task}?", "how can I {task} in Python?", "What should I use to {task}?")
_SIGNATURE = ("What arguments does {name} take?", "What is the signature of {name}?",
              "how do I call {name}?")  # fmt: skip
_MODULE = ("Which module is {short} in?", "where does {short} come from?",
           "What do I import to get {short}?")  # fmt: skip
_NAMES = ("Alice Smith", "Bob Jones", "Carol White", "Dan Brown", "Eve Miller", "Frank Moore")
# verbs a summary may start with for "How do I <summary>?" to read as a question
_VERBS = re.compile(r"^(?!Returns?\b|This\b|The\b|A\b|An\b|If\b)[A-Z][a-z]+\b(?<!s)(?<!ed) ")


class DialoguesConfig(StageConfig):
    """`stage: dialogues` in a recipe: the built-in dialogue data (see the module docstring)."""

    max_functions: int = Field(0, ge=0, description="use at most this many functions (0 = all)")
    small_talk_forms: int = Field(
        6, ge=1, description="dialogues per small-talk core phrasing, each a different surface form"
    )
    pii_fraction: float = Field(0.15, ge=0, le=1, description="user turns that carry planted PII")
    small_talk_pii_copies: int = Field(
        1, ge=0, description="training small-talk turns per core phrasing added again with a "
        "planted PII prefix (the same answer): every phrasing is seen after a self-introduction",
    )  # fmt: skip
    max_answer_chars: int = Field(160, ge=20, description="ask_usage: answer summary cap (chars)")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = Field(0, description="salt of the split hash and of the phrasing choices")

    def inputs(self) -> list:
        from lmforge.data.stdlib_docs import corpus_marker

        return [corpus_marker()]

    version_sources = (STDLIB_DOCS_VERSIONS,)


def _plant_pii(question: str, rng: random.Random, planted: Counter) -> str:
    """Prefix a person introducing themselves with an email and/or phone number."""
    name = rng.choice(_NAMES)
    first, last = name.lower().split()
    email = f"{first}.{last}{rng.randint(1, 99)}@example.com"
    phone = f"+1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    kind = rng.choice(("email", "phone", "both"))
    contact = {"email": email, "phone": phone, "both": f"{email}, {phone}"}[kind]
    planted["names"] += 1
    planted["email"] += kind in ("email", "both")
    planted["phone"] += kind in ("phone", "both")
    return f"I am {name} ({contact}). {question}"


def _function_dialogues(cfg: DialoguesConfig) -> list[tuple[str, str, str, str]]:
    """(split key, intent, user turn, answer) for each documented function."""
    rows, seen = [], set()
    functions = [f for f in stdlib_functions() if "." in f.qualname]
    if cfg.max_functions and len(functions) > cfg.max_functions:  # a seeded sample, all modules
        functions = random.Random(cfg.seed).sample(functions, cfg.max_functions)
    for fn in functions:
        if fn.qualname in seen:
            continue
        seen.add(fn.qualname)
        short = fn.qualname.rsplit(".", 1)[1]
        module = fn.qualname.rsplit(".", 1)[0]
        rng = random.Random(f"{cfg.seed}:{fn.qualname}")
        first = summary(fn.docstring, cfg.max_answer_chars)
        task = first.split(".")[0].rstrip()
        if _VERBS.match(task) and 3 <= len(task.split()) <= 14:
            q = rng.choice(_USAGE).format(task=task[0].lower() + task[1:])
            rows.append((fn.qualname, "ask_usage", q, f"Use {fn.qualname}. {first}"))
        if fn.signature and fn.signature != "(...)" and len(fn.signature) <= 80:
            q = rng.choice(_SIGNATURE).format(name=fn.qualname)
            rows.append((fn.qualname, "ask_signature", q, f"{fn.qualname}{fn.signature}"))
        if module == fn.module:  # a module-level function, not a method
            q = rng.choice(_MODULE).format(short=short)
            rows.append((fn.qualname, "ask_module", q, f"{short} is in the {module} module."))
    return rows


def make_dialogues(cfg: DialoguesConfig) -> tuple[dict[str, list[dict[str, Any]]], Counter]:
    """{split: [{context, response, intent, function}]} and the planted PII counts."""
    rows = _function_dialogues(cfg)
    rows += small_talk_turns(cfg.small_talk_forms, cfg.seed)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    planted: Counter = Counter()
    rng = random.Random(cfg.seed)
    plain_small_talk: dict[str, list[dict[str, Any]]] = {}  # training core phrasing -> its turns
    for key, intent, question, answer in rows:
        introduced = rng.random() < cfg.pii_fraction
        if introduced:
            question = _plant_pii(question, rng, planted)
        split = split_of(key, cfg)  # type: ignore[arg-type]  (val/test_fraction + seed)
        function = key if intent in FUNCTION_INTENTS else None
        row = {"context": question, "response": answer, "intent": intent, "function": function}
        out[split].append(row)
        if split == "train" and function is None and not introduced:
            plain_small_talk.setdefault(key, []).append(row)
    out["train"] += _introduced_small_talk(plain_small_talk, cfg, planted)
    return out, planted


def _introduced_small_talk(
    plain: dict[str, list[dict[str, Any]]], cfg: DialoguesConfig, planted: Counter
) -> list[dict[str, Any]]:
    """Copies of training small talk with a planted PII prefix: small_talk_pii_copies per core
    phrasing, of forms that have none. Planted at pii_fraction alone, ~15% of the phrasings were
    ever seen after "I am <NAME> (<EMAIL>).", and ~80% of the turns after it are questions; a
    held-out phrasing after it was then classified, and often answered, as a question (every
    intent-head miss of the recipe at three seeds). A copy beside its plain twin teaches that
    the prefix does not change the answer. Its own random stream: the other rows stay as they
    were."""
    rng = random.Random(f"{cfg.seed}:small-talk-pii")
    copies = []
    for turns in plain.values():
        for row in rng.sample(turns, min(cfg.small_talk_pii_copies, len(turns))):
            copies.append({**row, "context": _plant_pii(row["context"], rng, planted)})
    return copies


def dialogue_text(context: str, response: str) -> str:
    """One dialogue as the data stage's text: both turns, so both are cleaned and anonymized."""
    return f"{USER}{context}{ASSISTANT}{response}"


def parse_dialogue(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A data-stage row back into {context, response, intent, split, function}; a clear error
    otherwise."""
    text = row.get("text", "")
    if not text.startswith(USER) or ASSISTANT not in text or "intent" not in row:
        raise InputError(
            f"{where}: row {row.get('id', '?')} is not a dialogue (expected text 'User: ...\\n"
            "Assistant: ...' and an intent field); point dialogue.data at a data stage run "
            "over dialogues/dialogues.jsonl"
        )
    context, response = text[len(USER) :].split(ASSISTANT, 1)
    return {"context": context, "response": response, "intent": row["intent"],
            "split": row.get("dialogue_split", "train"), "function": row.get("function")}  # fmt: skip


def build(cfg: DialoguesConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes {train,val,test}.jsonl, dialogues.jsonl (for the data stage) and stats.json."""
    splits, planted = make_dialogues(cfg)
    empty = [s for s, rows in splits.items() if not rows]
    if empty:
        raise ConfigError(f"dialogues: no {', '.join(empty)} dialogues; raise max_functions")
    for split, rows in splits.items():
        write_jsonl(ctx.out / f"{split}.jsonl", rows)
    write_jsonl(
        ctx.out / "dialogues.jsonl",
        (
            {
                "text": dialogue_text(r["context"], r["response"]),
                "intent": r["intent"],
                "dialogue_split": split,
                "function": r["function"],
            }
            for split, rows in splits.items()
            for r in rows
        ),
    )
    intents = Counter(r["intent"] for rows in splits.values() for r in rows)
    counts = {s: len(rows) for s, rows in splits.items()}
    ctx.atomic_write_json(
        ctx.out / "stats.json", {"counts": counts, "intents": intents, "planted_pii": planted}
    )
    return {**{f"{s}_dialogues": n for s, n in counts.items()}, "intents": len(intents),
            **{f"planted_{k}": v for k, v in planted.items()}}  # fmt: skip
