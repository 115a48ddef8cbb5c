"""Report section of the align stage: the method's headline (pairwise accuracy, DPO/SimPO/ORPO
and KTO margins and ROUGE-L, PPO/GRPO reward, KL and ROUGE-L) before the same training curves as
the training stages."""

from __future__ import annotations

from typing import Any

from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import fmt_num
from lmforge.evals.report_sections.training import training_section

POLICY_FROM_PAIRS = {"dpo": "DPO", "simpo": "SimPO", "orpo": "ORPO"}
RL_METHODS = {"ppo": "PPO", "grpo": "GRPO"}  # policies trained on rewards of sampled answers


def _rouge(m: dict[str, Any], label: str = "ROUGE-L") -> str:
    """The "; ROUGE-L before -> after" ending of a headline, when the stage measured it."""
    if "rouge_l" not in m:
        return ""
    return f"; {label} {fmt_num(m['ref_rouge_l'])} -> {fmt_num(m['rouge_l'])}"


def _align_summary(method: str, m: dict[str, Any]) -> str:
    """The headline of an align stage in one sentence, by method (manifest metrics)."""
    if method == "reward" and "val_pair_accuracy" in m:
        return (f"Reward model: held-out pairwise accuracy {fmt_num(m['val_pair_accuracy'])} "
                f"(untrained head {fmt_num(m.get('base_val_pair_accuracy'))}).")  # fmt: skip
    if method in POLICY_FROM_PAIRS and "val_logp_margin" in m:
        text = (f"{POLICY_FROM_PAIRS[method]}: held-out chosen-over-rejected log-prob margin "
                f"{fmt_num(m['ref_logp_margin'])} -> {fmt_num(m['val_logp_margin'])}, preference accuracy "
                f"{fmt_num(m['val_pref_accuracy'])}")  # fmt: skip
        return text + _rouge(m) + "."
    if method == "kto" and "val_reward_auc" in m:
        text = (f"KTO: held-out desirable-over-undesirable log-prob margin "
                f"{fmt_num(m['ref_logp_margin'])} -> {fmt_num(m['val_logp_margin'])}, implicit "
                f"reward AUC {fmt_num(m['val_reward_auc'])}")  # fmt: skip
        if "val_pair_accuracy" in m:
            text += f", pairwise accuracy {fmt_num(m['val_pair_accuracy'])}"
        return text + _rouge(m) + "."
    if method in RL_METHODS and "val_reward" in m:
        gain = ""
        if "val_reward_gain_se" in m:  # paired by prompt
            gain = (f" (gain {fmt_num(m['val_reward_gain'])} +- "
                    f"{fmt_num(m['val_reward_gain_se'])} s.e.)")  # fmt: skip
        text = (f"{RL_METHODS[method]}: mean reward of held-out answers "
                f"{fmt_num(m['val_reward_before'])} -> {fmt_num(m['val_reward'])}{gain}")  # fmt: skip
        if "val_kl" in m:  # grpo: only when a reference is at hand
            text += f", KL to the reference {fmt_num(m['val_kl'])} nats per answer"
        return text + _rouge(m, "greedy ROUGE-L") + "."
    return ""


@register_section("align", replaces=("loss.png",))
def align_section(stage: StageInfo) -> list[Block]:
    """The method's headline sentence, then the training curves (for PPO val_loss is -reward)."""
    blocks = training_section(stage)
    config = stage.manifest.get("config", {})
    text = _align_summary(config.get("method", ""), stage.manifest.get("metrics", {}))
    if not text:
        return blocks
    blocks[0].summary = False
    return [Block(text=text, summary=True), *blocks]
