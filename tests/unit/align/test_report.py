"""The align stage's report section opens with its method's headline."""

import json

from lmforge.evals.report import StageInfo
from lmforge.evals.report_sections.align import align_section


def _stage(tmp_path, method, metrics):
    rows = [{"step": 1, "loss": 0.7, "tokens_seen": 10}, {"step": 2, "loss": 0.5, "val_loss": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {"config": {"method": method}, "metrics": metrics}
    return StageInfo(name=method, kind="align", path=tmp_path, manifest=manifest, assets=tmp_path)


def test_each_method_leads_with_its_headline(tmp_path):
    blocks = align_section(_stage(tmp_path, "ppo", {"val_reward_before": 2.27, "val_reward": 2.77,
                                                     "val_kl": 3.4}))  # fmt: skip
    assert blocks[0].summary and blocks[0].text.startswith("PPO: mean reward")
    assert "2.27 -> 2.77" in blocks[0].text and not blocks[1].summary
    assert any(b.image for b in blocks)  # the training curves follow
    paired = {"val_reward_before": 0.0, "val_reward": 0.5, "val_kl": 1.5, "val_reward_gain": 0.5,
              "val_reward_gain_se": 0.12}  # fmt: skip
    assert (
        "0 -> 0.5 (gain 0.5 +- 0.12 s.e.)" in align_section(_stage(tmp_path, "ppo", paired))[0].text
    )
    grpo = {**paired, "ref_rouge_l": 0.11, "rouge_l": 0.13}
    text = align_section(_stage(tmp_path, "grpo", grpo))[0].text
    assert text.startswith("GRPO: mean reward") and "ROUGE-L 0.11 -> 0.13" in text
    grpo.pop("val_kl")  # full tuning with beta 0 loads no reference: no KL
    assert "KL" not in align_section(_stage(tmp_path, "grpo", grpo))[0].text
    dpo = {"ref_logp_margin": 20.5, "val_logp_margin": 27.1, "val_pref_accuracy": 0.77,
           "ref_rouge_l": 0.14, "rouge_l": 0.17}  # fmt: skip
    assert "20.5 -> 27.1" in align_section(_stage(tmp_path, "dpo", dpo))[0].text
    assert align_section(_stage(tmp_path, "simpo", dpo))[0].text.startswith("SimPO: held-out")
    kto = {"ref_logp_margin": 20.5, "val_logp_margin": 24.0, "val_reward_auc": 0.81,
           "val_pair_accuracy": 0.78, "ref_rouge_l": 0.18, "rouge_l": 0.16}  # fmt: skip
    assert align_section(_stage(tmp_path, "kto", kto))[0].text == (
        "KTO: held-out desirable-over-undesirable log-prob margin 20.5 -> 24, implicit reward AUC "
        "0.81, pairwise accuracy 0.78; ROUGE-L 0.18 -> 0.16."
    )
    reward = {"val_pair_accuracy": 0.75, "base_val_pair_accuracy": 0.5}
    assert "pairwise accuracy 0.75" in align_section(_stage(tmp_path, "reward", reward))[0].text
    # a stage without its headline metrics still gets the curves
    assert align_section(_stage(tmp_path, "reward", {}))[0].summary
