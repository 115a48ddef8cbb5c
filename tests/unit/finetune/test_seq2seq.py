"""Task seq2seq: {source, target} records, rows, the copy task learned from scratch, BART/T5 dirs."""

import json
import random
import re
import shutil

import pytest
import torch

from lmforge.artifacts import read_manifest
from lmforge.config import validate
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.formats import load_examples
from lmforge.finetune.seq2seq import Seq2SeqIds, encode_pairs, seq2seq_eval
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.config import preset_config
from lmforge.model.convert import save_pretrained
from lmforge.model.seq2seq import Seq2SeqLM

WORDS = "red blue green cat dog sun moon tree".split()


def _copy_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        rows.append({"source": words, "target": words})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, tok_dir, data, **kw) -> FinetuneConfig:
    train = {"max_steps": 4, "micro_batch_size": 4, "seq_len": 32, "warmup_steps": 1,
             "eval_every": 0, "ckpt_every": 0, "eval_steps": 1, **kw.pop("train", {})}  # fmt: skip
    return FinetuneConfig(
        model=tok_dir, data=data, out=tmp_path / "ft", task="seq2seq", train=train,
        eval={"rouge_examples": 4, "max_new_tokens": 8}, **kw,
    )  # fmt: skip


def test_source_target_and_input_output_records(tmp_path):
    data = _write(tmp_path / "a.jsonl", [{"source": "x y", "target": "y x"}])
    assert load_examples(data) == ("seq2seq", [{"source": "x y", "target": "y x"}])
    data = _write(tmp_path / "b.jsonl", [{"input": "x", "output": "y"}])
    assert load_examples(data)[1] == [{"source": "x", "target": "y"}]
    alpaca = _write(tmp_path / "c.jsonl", [{"instruction": "do", "input": "x", "output": "y"}])
    assert load_examples(alpaca)[0] == "alpaca"  # an instruction makes it a chat record


@pytest.mark.parametrize(
    ("second", "expect"),
    [({"source": "x"}, "bad.jsonl line 2: record with keys ['source'] does not fit"),
     ({"source": " ", "target": "y"}, "bad.jsonl line 2: source and target must be non-empty")],
)  # fmt: skip
def test_a_bad_record_names_file_and_line(tmp_path, second, expect):
    bad = _write(tmp_path / "bad.jsonl", [{"source": "a", "target": "b"}, second])
    with pytest.raises(InputError, match=re.escape(expect)):
        load_examples(bad)


def test_rows_shift_the_target_right_and_end_with_eos(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    ids = Seq2SeqIds(pad=0, eos=2, decoder_start=1)
    rows, cut = encode_pairs(tok, [{"source": "cat", "target": "dog"}, {"source": "sun moon",
                                    "target": "tree"}], ids, 32)  # fmt: skip
    src, tgt = tok.encode("cat"), tok.encode("dog")
    assert cut == 0
    assert rows["input_ids"][0, : len(src) + 1].tolist() == [*src, 2]
    assert rows["attention_mask"][0].sum() == len(src) + 1
    assert rows["decoder_input_ids"][0, : len(tgt) + 1].tolist() == [1, *tgt]
    assert rows["labels"][0, : len(tgt) + 1].tolist() == [*tgt, 2]
    assert (rows["labels"][0, len(tgt) + 1 :] == -100).all()


def test_copy_task_from_scratch_learns_and_exports_to_transformers(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    train = _write(tmp_path / "train.jsonl", _copy_pairs(400, seed=0))
    val = _write(tmp_path / "val.jsonl", _copy_pairs(32, seed=1))
    cfg = _config(
        tmp_path, tokenizer_dir, train, val_data=val, from_scratch="bart-micro",
        train={"max_steps": 300, "lr": 1.5e-3, "micro_batch_size": 16, "schedule": "constant",
               "warmup_steps": 10, "eval_steps": 2},
    )  # fmt: skip
    cfg.eval.rouge_examples, cfg.eval.max_new_tokens = 32, 16
    tok = load_chat_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    untrained = Seq2SeqLM(preset_config("bart-micro", vocab_size=tok.vocab_size))
    ids = Seq2SeqIds.of({}, tok)
    before, _ = seq2seq_eval(untrained, tok, _copy_pairs(32, seed=1), ids, 16, 16)
    m = read_manifest(finetune(cfg))["metrics"]
    assert before["exact_match"] == 0 and before["rougeL"] < 0.2
    assert m["exact_match"] >= 0.6 and m["rougeL"] >= 0.85, m
    assert m["val_loss"] < 0.2 and "bleu" in m and m["eval_examples"] == 32
    final = tmp_path / "ft" / "final"
    outputs = [
        json.loads(x) for x in (tmp_path / "ft" / "val_outputs.jsonl").read_text().split("\n") if x
    ]
    assert sum(o["output"] == o["target"] for o in outputs) / 32 == pytest.approx(
        m["exact_match"], abs=1e-4
    )
    # transformers' BART generates the same greedy output from final/
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(final).eval()
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == ids.decoder_start and gen["eos_token_id"] == ids.eos
    src = torch.tensor([[*tok.encode(outputs[0]["source"]), ids.eos]])
    theirs = hf.generate(src, do_sample=False, max_new_tokens=16)
    assert tok.decode(theirs[0].tolist()).strip() == outputs[0]["output"]


def _bart_dir(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    vocab = load_chat_tokenizer(tokenizer_dir).vocab_size
    path = tmp_path / "bart"
    save_pretrained(Seq2SeqLM(preset_config("bart-micro", vocab_size=vocab)), path,
                    extra_config={"pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2})  # fmt: skip
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path


def _t5_dir(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=load_chat_tokenizer(tokenizer_dir).vocab_size, d_model=32, d_kv=8, d_ff=64,
        num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    path = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path


@pytest.mark.parametrize("make_base", [_bart_dir, _t5_dir], ids=["bart", "t5"])
def test_lora_writes_a_peft_adapter_equal_to_the_merged_model(tmp_path, tokenizer_dir, make_base):
    base = make_base(tmp_path, tokenizer_dir)
    data = _write(tmp_path / "d.jsonl", _copy_pairs(24, seed=0))
    out = finetune(_config(tmp_path, base, data, method="lora"))
    m = read_manifest(out)["metrics"]
    assert 0 < m["trainable_fraction"] < 0.5 and "base_rougeL" in m
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    # PEFT applies adapter/ to transformers' BART of the base: the merged final/'s logits
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    hf_base = transformers.AutoModelForSeq2SeqLM.from_pretrained(base).eval()
    with_adapter = peft.PeftModel.from_pretrained(hf_base, out / "adapter").eval()
    final = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[2, 9, 10]])
    with torch.no_grad():
        merged = final(input_ids=src, decoder_input_ids=tgt).logits
        torch.testing.assert_close(
            with_adapter(input_ids=src, decoder_input_ids=tgt).logits, merged, atol=1e-4, rtol=0
        )
        with with_adapter.disable_adapter():
            untuned = with_adapter(input_ids=src, decoder_input_ids=tgt).logits
    assert (untuned - merged).abs().max() > 1e-5  # the adapters did train
    start = json.loads((base / "config.json").read_text())["decoder_start_token_id"]
    assert (
        json.loads((out / "final" / "config.json").read_text())["decoder_start_token_id"] == start
    )


def test_t5_dir_fine_tunes_through_the_adapter(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    base = _t5_dir(tmp_path, tokenizer_dir)
    data = _write(tmp_path / "d.jsonl", _copy_pairs(24, seed=0))
    out = finetune(_config(tmp_path, base, data, train={"max_steps": 8, "lr": 3e-3}))
    m = read_manifest(out)["metrics"]
    assert m["val_loss"] < m["base_val_loss"] and {"rougeL", "base_rougeL", "bleu"} <= set(m)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final")
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    before = transformers.T5ForConditionalGeneration.from_pretrained(base)
    assert not torch.equal(hf.lm_head.weight, before.lm_head.weight)  # trained weights written


def test_task_mismatches_are_config_errors(tmp_path, tokenizer_dir, model_dir):
    pairs = _write(tmp_path / "p.jsonl", _copy_pairs(8, seed=0))
    with pytest.raises(ConfigError, match="is not an encoder-decoder"):
        finetune(_config(tmp_path, model_dir, pairs))
    with pytest.raises(ConfigError, match=r"for seq2seq freeze by name with freeze\.patterns"):
        finetune(_config(tmp_path, tokenizer_dir, pairs, from_scratch="bart-micro",
                         freeze={"first_n_layers": 1}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.seq_len=256 exceeds the model's block_size=128"):
        finetune(_config(tmp_path, tokenizer_dir, pairs, from_scratch="bart-micro",
                         train={"seq_len": 256}))  # fmt: skip
    with pytest.raises(ConfigError, match="'micro' is not an encoder-decoder"):
        finetune(_config(tmp_path, tokenizer_dir, pairs, from_scratch="micro"))
    chat = _write(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    with pytest.raises(ConfigError, match="does not hold source\\+target records"):
        finetune(_config(tmp_path, tokenizer_dir, chat, from_scratch="bart-micro"))
    with pytest.raises(ConfigError, match="use --task seq2seq"):
        finetune(_config(tmp_path, model_dir, pairs).model_copy(update={"task": "sft"}))


def test_eval_model_generates_from_a_seq2seq_dir(tmp_path, tokenizer_dir):
    from lmforge.evals.lm import EvalModel, GenerationSettings
    from lmforge.model.seq2seq_generate import generate_seq2seq_batched

    base = _bart_dir(tmp_path, tokenizer_dir)
    model = EvalModel.load(base)
    tok = load_chat_tokenizer(base)
    [ids] = generate_seq2seq_batched(
        model.model, [[*tok.encode("cat dog"), 2]], 6, decoder_start_id=2, pad_id=0,
        stop_tokens=[2], greedy=True,
    )  # fmt: skip
    settings = GenerationSettings(max_new_tokens=6)
    assert model.generate("cat dog", settings) == tok.decode(ids)


def test_eval_num_beams_writes_transformers_beam_outputs(tmp_path, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    base = _bart_dir(tmp_path, tokenizer_dir)
    data = _write(tmp_path / "d.jsonl", _copy_pairs(24, seed=0))
    cfg = _config(tmp_path, base, data, train={"max_steps": 8, "lr": 3e-3})
    cfg.eval.num_beams, cfg.eval.compare_base = 3, False
    out = finetune(cfg)
    outputs = [json.loads(x) for x in (out / "val_outputs.jsonl").read_text().splitlines()]
    tok = load_chat_tokenizer(tokenizer_dir)
    assert any(row["output"] for row in outputs)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
    for row in outputs:
        src = torch.tensor([[*tok.encode(row["source"]), 2]])
        with torch.no_grad():
            new = hf.generate(src, do_sample=False, num_beams=3, max_new_tokens=8)[0, 1:]
        assert tok.decode([t for t in new.tolist() if t != 2]).strip() == row["output"]


def test_eval_num_beams_is_refused_outside_seq2seq(tmp_path):
    base = {"model": str(tmp_path), "data": str(tmp_path / "d.jsonl"), "out": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"eval\.num_beams=2 applies to --task seq2seq"):
        validate(FinetuneConfig, {**base, "eval": {"num_beams": 2}})
    assert validate(FinetuneConfig, {**base, "task": "seq2seq", "eval": {"num_beams": 2}})
