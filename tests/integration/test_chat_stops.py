"""Issue 19: a fine-tuned chat model stops at its template's end of turn, in transformers too.

The base is what `lmforge tokenizer train` + `pretrain` write (eos <|endoftext|>, ChatML's
<|im_end|> a separate token), so config.json's eos is the document end, as in the quickstart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.common.io import write_jsonl
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.config import preset_config
from lmforge.model.convert import save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import TokenizerConfig, TokenizerFiles, train_tokenizer
from lmforge.tokenizer.files import TOKENIZER_FILES
from lmforge.tokenizer.generation import GENERATION_CONFIG

WORDS = ["alpha", "beta", "gamma", "delta"]
TRAIN = {"max_steps": 40, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 64, "warmup_steps": 2,
         "eval_every": 0, "ckpt_every": 0}  # fmt: skip


def base_model(root: Path) -> Path:
    """A random micro model with an lmforge-trained tokenizer, saved as pretrain saves it."""
    data = root / "data"
    data.mkdir(parents=True)
    texts = [f"the {w} model reads {v} text" for w in WORDS for v in WORDS] * 5
    write_jsonl(data / "train.jsonl.zst", ({"text": t, "id": str(i)} for i, t in enumerate(texts)))
    tok_dir = train_tokenizer(TokenizerConfig(data=data, out=root / "tok", vocab_size=300))
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    model = Transformer(preset_config("micro", vocab_size=tok.vocab_size))
    save_pretrained(model, root / "base", extra_config=tok.special_token_ids())
    for name in TOKENIZER_FILES:
        shutil.copy2(tok_dir / name, root / "base" / name)
    return root / "base"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """final/ of a short SFT run that answers "Repeat <word>" and ends its turn."""
    root = tmp_path_factory.mktemp("chat_stops")
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"} for w in WORDS] * 10
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig.model_validate(
        {"model": base_model(root), "data": root / "d.jsonl", "out": root / "sft", "train": TRAIN,
         "eval": {"rouge_examples": 2, "max_new_tokens": 8}}
    )  # fmt: skip
    return finetune(cfg) / "final"


def test_finetuned_export_lists_the_turn_end_with_the_document_end(tuned: Path) -> None:
    tok = TokenizerFiles.load(tuned)
    end, im_end = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    config = json.loads((tuned / "config.json").read_text())
    assert config["eos_token_id"] == end != im_end  # the document end, as in the issue
    gen = json.loads((tuned / GENERATION_CONFIG).read_text())
    assert gen == {"eos_token_id": [end, im_end], "bos_token_id": end, "pad_token_id": 1}
    assert EvalModel.load(tuned).stop_ids() == [end, im_end]


def test_transformers_generate_stops_at_the_end_of_turn(tuned: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tuned)
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    ours = EvalModel.load(tuned)
    settings = GenerationSettings(max_new_tokens=30)

    def answer(model_dir: Path, word: str) -> list[int]:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        messages = [{"role": "user", "content": f"Repeat {word}"}]
        inputs = hf_tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    # the export as it was before issue 19: no generation_config.json, so the reply runs on
    before = tmp_path / "before"
    shutil.copytree(tuned, before, ignore=shutil.ignore_patterns(GENERATION_CONFIG))
    for word in WORDS:
        new = answer(tuned, word)
        assert len(new) < 30 and new[-1] == im_end and im_end not in new[:-1], new
        assert hf_tok.decode(new[:-1]).strip()  # it answers before it stops
        # lmforge's own generate stops at the same token with the same answer
        assert ours.generate(f"Repeat {word}", settings, chat=True) == hf_tok.decode(
            new, skip_special_tokens=True
        )
        unstopped = answer(before, word)
        assert unstopped[: len(new)] == new and len(unstopped) > len(new)
