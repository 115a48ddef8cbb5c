"""compress prune: magnitude sparsity, structured units/heads that drop what matters least,
and a recovery fine-tune through the one loop that keeps pruned weights at zero."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.compress.prune import magnitude_prune, prune_heads, prune_neurons, sparsity_of
from lmforge.compress.stage import CompressConfig, compress
from lmforge.errors import ConfigError
from lmforge.model.config import preset_config
from lmforge.model.convert import load_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.files import TokenizerFiles, tokenizer_hash
from unit.evals.helpers import CORPUS


def micro(preset: str = "micro") -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset_config(preset)).eval()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_reaches_the_target_sparsity(scope: str) -> None:
    model = micro()
    masks = magnitude_prune(model, 0.5, scope)
    assert abs(sparsity_of(model) - 0.5) < 0.01
    if scope == "layer":
        for name, p in model.named_parameters():
            if name in masks:
                assert abs((p == 0).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
def test_neuron_pruning_drops_the_units_that_do_nothing(preset: str) -> None:
    model = micro(preset)
    hidden = model.config.intermediate_size
    dead = torch.arange(0, hidden, 4)  # a quarter of the units contribute nothing
    for block in model.blocks:
        block.mlp.proj.weight.data[:, dead] = 0
    ids = torch.arange(1, 20)[None]
    pruned = prune_neurons(model, 0.25)
    assert pruned.config.intermediate_size == hidden - len(dead)
    assert pruned.num_params() < model.num_params()
    with torch.no_grad():
        assert torch.allclose(pruned(ids), model(ids), atol=1e-5)


def test_head_pruning_drops_the_kv_group_that_does_nothing() -> None:
    model = micro()  # 4 query heads sharing 2 kv heads
    hd = model.config.hd
    for block in model.blocks:  # group 1's heads (query heads 2 and 3) write nothing
        block.attn.proj.weight.data[:, 2 * hd : 4 * hd] = 0
    pruned = prune_heads(model, 0.5)
    assert (pruned.config.n_head, pruned.config.n_kv_head, pruned.config.hd) == (2, 1, hd)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert torch.allclose(pruned(ids), model(ids), atol=1e-5)
    with pytest.raises(ConfigError, match="removes no key/value group"):
        prune_heads(model, 0.1)


def write_tokens(model_dir: Path, out: Path) -> Path:
    """train.bin/val.bin/meta.json of CORPUS, as `lmforge tokenizer encode` lays them out."""
    files = TokenizerFiles.load(model_dir)
    ids = [i for text in CORPUS * 8 for i in [files.token_id("<|eos|>"), *files.encode(text)]]
    out.mkdir()
    for split in ("train", "val"):
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": files.vocab_size,
            "tokenizer_hash": tokenizer_hash(model_dir)}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_prune_stage_recovers_and_keeps_zeros(trained_dir: Path, data_dir: Path, tmp_path: Path):
    tokens = write_tokens(trained_dir, tmp_path / "tokens")
    cfg = CompressConfig(method="prune", model=trained_dir, data=data_dir, tokens=tokens,
                         prune={"kind": "magnitude", "sparsity": 0.6}, out=tmp_path / "p",
                         train={"max_steps": 20, "seq_len": 32, "micro_batch_size": 4,
                                "ckpt_every": 0, "eval_every": 0, "eval_steps": 2})  # fmt: skip
    out = compress(cfg)
    report = json.loads((out / "compression.json").read_text())
    assert report["recovery"]["steps"] == 20
    assert report["after"]["perplexity"] < report["before_recovery"]["perplexity"]
    assert report["pruning"]["block_sparsity"] >= 0.6 - 0.01  # the fine-tune kept the zeros
    assert sparsity_of(load_pretrained(out / "final")) >= 0.59
    assert (out / "final" / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset", ["micro", "bert-micro"])
def test_prune_keeps_a_classifier_head_distill_export_and_recovery_refuse_it(
    preset: str, tmp_path: Path
):
    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.model.convert import load_classifier, save_pretrained
    from lmforge.tokenizer.files import copy_tokenizer_files
    from unit.finetune.helpers import make_tokenizer_dir

    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    tok = TokenizerFiles.load(tok_dir)
    torch.manual_seed(0)
    lm = Transformer(preset_config(preset, vocab_size=tok.vocab_size))
    head = SequenceClassifier(lm, 2).classifier_head(["no", "yes"])
    save_pretrained(lm, tmp_path / "cls", extra_config={"pad_token_id": tok.pad_id},
                    classifier=head)  # fmt: skip
    copy_tokenizer_files(tok_dir, tmp_path / "cls")
    cfg = {"model": tmp_path / "cls", "prune": {"kind": "neurons", "sparsity": 0.5}}
    final = compress(
        CompressConfig.model_validate({"method": "prune", "out": tmp_path / "p", **cfg})
    )
    kept = load_classifier(final / "final")
    assert kept is not None and kept.labels == head.labels and torch.equal(kept.weight, head.weight)
    if head.pool_weight is not None:  # the encoder's pooler too
        assert torch.equal(kept.pool_weight, head.pool_weight)
    config = json.loads((final / "final" / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_id and config["architectures"][0].endswith(
        "ForSequenceClassification"
    )
    refused = {"distill": r"distill", "export": r"export", "prune": r"prune's recovery on tokens"}
    for method, says in refused.items():
        values = {"method": method, "out": tmp_path / method, "tokens": tmp_path, **cfg}
        with pytest.raises(ConfigError, match=rf"is a classifier: {says}"):
            compress(CompressConfig.model_validate(values))
        assert not (tmp_path / method / "manifest.json").exists()
