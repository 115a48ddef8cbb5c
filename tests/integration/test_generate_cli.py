"""`lmforge generate`: the CLI prints and writes what EvalModel generates, and bad input is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unit.evals.helpers import trained_model_dir
from unit.finetune.helpers import make_model_dir as make_chat_model_dir
from unit.finetune.helpers import make_tokenizer_dir

from lmforge.common.io import read_prompts
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.sample import sample

PROMPTS = ["def add(a, b):\n", "The quick brown", "import os\n"]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model_dir(tmp_path_factory.mktemp("gen") / "model")


def test_cli_prints_and_writes_the_greedy_answers(model_dir: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[1:]))
    out = tmp_path / "answers.jsonl"
    proc = lmforge("generate", "--model", str(model_dir), "-p", PROMPTS[0], "--prompts",
                   str(prompts_file), "--max-new-tokens", "12", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = EvalModel.load(model_dir).generate_batch(
        PROMPTS, GenerationSettings(max_new_tokens=12)
    )
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == expected
    assert any(expected), "the trained model should write something"
    for prompt, answer in zip(PROMPTS, expected, strict=True):
        assert f"> {prompt}\n{answer}\n" in proc.stdout


def test_cli_beam_search_writes_transformers_beam_answers(model_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "beams.jsonl"
    asked = [
        "--model",
        str(model_dir),
        "-p",
        PROMPTS[0],
        "-p",
        PROMPTS[1],
        "--max-new-tokens",
        "10",
    ]
    beams = ["--num-beams", "3", "--length-penalty", "0.5", "--out", str(out)]
    proc = lmforge("generate", *asked, *beams)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    lm = EvalModel.load(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt, row in zip(PROMPTS[:2], rows, strict=True):
        ids = lm.start(prompt)
        with torch.no_grad():
            new = hf.generate(
                torch.tensor([ids]), do_sample=False, num_beams=3, length_penalty=0.5,
                max_new_tokens=10,
            )[0, len(ids) :].tolist()  # fmt: skip
        assert row["completion"] == lm.decode([t for t in new if t not in lm.stop_ids()])
    greedy = lm.generate_batch(PROMPTS[:2], GenerationSettings(max_new_tokens=10))
    assert [r["completion"] for r in rows] != greedy
    sampled = lmforge("generate", *asked, "--num-beams", "2", "--temperature", "0.8")
    assert sampled.returncode == 2 and "beam search does not sample" in sampled.stderr


def test_cli_bad_prompts_file_is_one_line_naming_the_line(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    proc = lmforge("generate", "--model", str(model_dir), "--prompts", str(bad))
    assert proc.returncode == 2
    assert f'{bad} line 2: expected an object with a "prompt" string' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_compile_is_checked_and_auto_on_cpu_answers_as_eager(model_dir: Path) -> None:
    proc = lmforge("generate", "--model", str(model_dir), "-p", "x", "--compile", "always")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "compile" in proc.stderr and "'off', 'on' or 'auto'" in proc.stderr
    proc = lmforge("generate", "--model", str(model_dir), "-p", PROMPTS[1], "--max-new-tokens",
                   "8", "--compile", "auto")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    expected = EvalModel.load(model_dir).generate(PROMPTS[1], GenerationSettings(max_new_tokens=8))
    assert f"> {PROMPTS[1]}\n{expected}\n" in proc.stdout


def test_sampling_is_seeded_and_num_samples_needs_a_temperature(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=3)
    first = sample(model, PROMPTS[:2], settings, num_samples=3)
    assert [(r["prompt"], r["sample"]) for r in first] == [
        (p, i) for p in PROMPTS[:2] for i in range(3)
    ]
    assert first == sample(model, PROMPTS[:2], settings, num_samples=3)
    assert first == sample(model, PROMPTS[:2], settings, num_samples=3, batch_size=1)
    assert len({r["completion"] for r in first}) > 1, "temperature 1 should vary the answers"
    with pytest.raises(ConfigError, match="set --temperature above 0"):
        sample(model, PROMPTS, GenerationSettings(), num_samples=2)
    with pytest.raises(ConfigError, match="drop --num-samples or --num-beams"):
        sample(model, PROMPTS, GenerationSettings(num_beams=2), num_samples=2)
    with pytest.raises(InputError, match="no prompts"):
        sample(model, [], GenerationSettings())


def test_chat_answers_go_through_the_chat_template(tmp_path: Path) -> None:
    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    model = EvalModel.load(make_chat_model_dir(tmp_path / "chat_model", tok_dir))
    settings = GenerationSettings(max_new_tokens=6)
    rows = sample(model, ["What is the capital of France?"], settings, chat=True)
    assert rows[0]["completion"] == model.generate(
        "What is the capital of France?", settings, chat=True
    )
    (tmp_path / "plain").mkdir()
    plain = trained_model_dir(tmp_path / "plain" / "model")
    with pytest.raises(InputError, match="has no chat template; drop --chat"):
        sample(EvalModel.load(plain), ["hi"], settings, chat=True)


def test_read_prompts_plain_text_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  \nsecond prompt\n")
    assert read_prompts(path) == ["first prompt", "second prompt"]
    with pytest.raises(InputError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_cli_min_length_counts_the_prompt_and_min_new_tokens_wins(
    model_dir: Path, tmp_path: Path
) -> None:
    # make the greedy first token a stop token: unforced, the answer is that one token
    shutil.copytree(model_dir, model := tmp_path / "model")
    lm = EvalModel.load(model)
    prompt = PROMPTS[2]
    ids = lm.start(prompt)
    with torch.no_grad():
        first = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
    config_file = model / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config_file.write_text(json.dumps({**config, "eos_token_id": [*lm.stop_ids(), first]}))

    def answer(*args: str) -> tuple[str, str]:
        out = tmp_path / "answers.jsonl"
        proc = lmforge("generate", "--model", str(model), "-p", prompt, "--max-new-tokens", "4",
                       "--out", str(out), *args)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(out.read_text())["completion"], " ".join(
            (proc.stdout + proc.stderr).split()
        )

    short = lm.decode([first])
    assert answer()[0] == short
    assert answer("--min-length", str(len(ids)))[0] == short  # the prompt already has that length
    forced, _ = answer("--min-length", str(len(ids) + 2))  # the stop barred for 2 new tokens
    expected = EvalModel.load(model).generate_batch(
        [prompt], GenerationSettings(max_new_tokens=4, min_length=len(ids) + 2)
    )
    assert forced == expected[0] and not forced.startswith(short)
    both, printed = answer("--min-length", str(len(ids) + 2), "--min-new-tokens", "0")
    assert both == short and "min_new_tokens applies alone" in printed
