"""Counterfactual bias: term swapping, the gap report with a planted gap, a real LM, term counts."""

from __future__ import annotations

import json

import pytest

from lmforge.data.bias_stats import TermCounter, split_term_report, stage_term_report
from lmforge.data.terms import load_groups
from lmforge.errors import InputError
from lmforge.evals.bias import counterfactual_pairs, gap_report
from lmforge.evals.errors import worst_examples
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.tasks import TaskSpec, run_task

from .helpers import make_model_dir, train_briefly, write_split


def _gender():
    return load_groups(names=["gender"])[0]


def test_rewrite_is_whole_word_and_keeps_case():
    g = _gender()
    text = "He gave HIS book to her; Hector and the chemist met the Woman."
    assert g.rewrite(text, 1) == (
        "She gave HER book to her; Hector and the chemist met the Woman.",
        4,
    )
    assert g.rewrite(text, 0)[0] == "He gave HIS book to him; Hector and the chemist met the Man."
    assert g.find("Sheet, ashen; she") == ["she"]


def test_user_term_files_json_and_yaml(tmp_path):
    path = tmp_path / "terms.yaml"
    path.write_text("fruit:\n  sides: [apple, pear]\n  pairs: [[apple, pear], [apples, pears]]\n")
    (g,) = load_groups(path)
    assert g.sides == ("apple", "pear") and g.rewrite("Apples!", 1)[0] == "Pears!"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"sides": ["a"], "pairs": [["a", "b"]]}}))
    with pytest.raises(InputError, match="group 'x' needs 'sides'"):
        load_groups(bad)
    bad.write_text('{"x": {"sides": ["a", "b"]')
    with pytest.raises(
        InputError, match=r"bad\.json is not valid JSON \(line 1 column 27: .*; mend"
    ):
        load_groups(bad)
    with pytest.raises(InputError, match=r"bias groups \['nope'\] are not in"):
        load_groups(names=["nope"])


def test_a_malformed_yaml_term_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "terms.yaml"
    for text, error in [
        ("fruit:\n  sides: [apple, pear]\n  pairs: [[apple, pear]\n",
         r"terms\.yaml line 4: not valid YAML .*; mend it"),
        ("- fruit\n", r"terms\.yaml: top level must be a mapping.*; mend it"),
        ("fruit: [apple, pear]\n", r"group 'fruit' needs 'sides' \(two names\) and 'pairs'"),
        ("# every group commented out\n", r"terms\.yaml holds no term groups; mend it"),
    ]:  # fmt: skip
        path.write_text(text)
        with pytest.raises(InputError, match=error):
            load_groups(path)


def test_planted_score_shows_a_gap_for_its_group_and_none_for_another():
    """A scorer that prefers 'she' and 'woman' texts: gender gap -1, religion gap 0."""
    groups = load_groups(names=["gender", "religion"])
    texts = [
        "he went to the church on sunday",
        "she prays in the mosque",
        "the man read the bible",
        "a quiet walk in the park",  # no term: not scored
    ]
    score = lambda batch: [float(bool({"she", "woman"} & set(t.split()))) for t in batch]  # noqa: E731
    metrics, records = gap_report(texts, groups, score)
    gender, religion = metrics["groups"]["gender"], metrics["groups"]["religion"]
    assert gender["n"] == 3 and gender["mean_gap"] == -1.0 and gender["std_gap"] == 0.0
    assert religion["n"] == 3 and religion["mean_abs_gap"] == 0.0
    assert metrics["max_abs_gap"] == 1.0 and metrics["worst_group"] == "gender"
    assert len(records) == 6 and {r["index"] for r in records} == {0, 1, 2}
    assert gender["worst"][0]["text_b"].startswith("she")
    rows = worst_examples("counterfactual", records, 2, model="m", task="t")
    assert [abs(r["score"]) for r in rows] == [1.0, 1.0]
    with pytest.raises(InputError, match="no example mentions a term"):
        gap_report(["a quiet walk"], groups, score)


def test_pairs_only_for_groups_a_text_mentions():
    groups = load_groups(names=["gender", "age"])
    pairs = counterfactual_pairs(["the old man", "a young dog", "nothing here"], groups)
    assert [(p["index"], p["group"]) for p in pairs] == [(0, "gender"), (0, "age"), (1, "age")]


def test_lm_trained_on_one_side_scores_it_higher(tmp_path):
    """A micro LM fitted to texts where only 'she' occurs: the gender gap is large and negative."""
    texts = [f"{w} writes the code and then {w} reads the file." for w in ["she"] * 6] + [
        f"people go to the {p} every week." for p in ["church", "mosque"] * 3
    ]
    model_dir = train_briefly(make_model_dir(tmp_path / "m"), texts, steps=40)
    model = EvalModel.load(model_dir)
    spec = TaskSpec(
        name="bias", type="counterfactual", groups=["gender", "religion"],
        examples=[{"text": "she writes the code and then she reads the file."},
                  {"text": "people go to the church every week."}],
    )  # fmt: skip
    result = run_task(model, spec, GenerationSettings())
    gender, religion = result.metrics["groups"]["gender"], result.metrics["groups"]["religion"]
    assert result.metrics["scoring"] == "log-likelihood per token"
    assert gender["mean_gap"] < -0.3  # "he ..." is much less likely than "she ..."
    assert abs(religion["mean_gap"]) < abs(gender["mean_gap"]) / 3


def test_term_counter_reports_per_1k_words_ratio_and_labels():
    counter = TermCounter(load_groups(names=["gender"]))
    for _ in range(10):
        counter.add("she said that she would come", label="care")
    counter.add("he said no", label="build", copies=2)
    report = counter.to_dict()
    g = report["groups"]["gender"]
    assert report["words"] == 10 * 6 + 2 * 3
    assert g["sides"]["female"]["count"] == 20 and g["sides"]["male"]["count"] == 2
    assert g["sides"]["female"]["per_1k_words"] == pytest.approx(1000 * 20 / 66, abs=1e-3)
    assert g["ratio"] == pytest.approx(0.1)
    assert g["sides"]["female"]["by_label"] == {"care": 10}
    assert g["sides"]["male"]["rows"] == 2
    by_split = split_term_report({"train": [{"text": "the woman"}]}, load_groups(names=["gender"]))
    assert by_split["train"]["groups"]["gender"]["ratio"] == 0.0


def test_stage_report_counts_the_splits_when_stats_json_has_none(tmp_path):
    write_split(tmp_path, "train", ["she and her mother", "the man"])
    write_split(tmp_path, "val", ["nothing"])
    (tmp_path / "stats.json").write_text(json.dumps({"splits": {"train": 2}}))
    report = stage_term_report(tmp_path, groups=None)
    assert set(report) == {"train", "val"}
    sides = report["train"]["groups"]["gender"]["sides"]
    assert sides["female"]["count"] == 3 and sides["male"]["count"] == 1
    (tmp_path / "stats.json").write_text(
        json.dumps({"bias": {"train": {"words": 1, "groups": {}}}})
    )
    assert stage_term_report(tmp_path) == {"train": {"words": 1, "groups": {}}}
    with pytest.raises(InputError, match="has no split files"):
        stage_term_report(tmp_path / "nope", groups=["gender"])
