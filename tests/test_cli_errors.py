"""Every verb, given bad input, prints one line naming the problem and exits 2 (never a traceback); argument and
file errors are answered before torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cacheaug.cli import VERBS, Verb, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ALL_VERBS = [name if isinstance(entry, Verb) else f"{name} {task}"
             for name, entry in VERBS.items() for task in ([None] if isinstance(entry, Verb) else entry)]


def _error(capsys, argv: list[str], *words: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("cacheaug"), err
    for word in words:
        assert word in err, (argv, err)
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny-random checkpoint, the same made for another base, data for every task, a malformed config."""
    import torch

    from cacheaug import AugmentedLM, CoprocessorConfig, load_base

    root = tmp_path_factory.mktemp("bad-inputs")
    base, _ = load_base("tiny-random")
    torch.manual_seed(0)
    AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=2)).save_pretrained(root / "ckpt")
    other = root / "other-base"
    AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=2)).save_pretrained(other)
    description = json.loads((other / "cacheaug_config.json").read_text())
    description["coprocessor"]["base_identity"]["hidden_size"] = 128
    (other / "cacheaug_config.json").write_text(json.dumps(description))
    (root / "text.txt").write_text("Some text to read. " * 40)
    gsm8k = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}] * 2
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in gsm8k))
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in gsm8k))
    (root / "mc.jsonl").write_text(json.dumps({"context": "Pick:", "choices": ["a", "b"], "gold": 0}) + "\n")
    (root / "bad.yaml").write_text("ckpt: [unclosed\n  out: {")
    (root / "run").mkdir()
    return root


def _verb_args(verb: str, files: Path, ckpt: Path) -> list[str]:
    """A command line of ``verb`` that is complete and valid but for what the caller adds or changes."""
    out = str(files / "out")
    return {
        "train": ["train", "--config", TINY, "--train.output_dir", str(files / "train-run")],
        "eval ahead": ["eval", "ahead", "--ckpt", str(ckpt), "--batches", "1"],
        "eval perplexity": ["eval", "perplexity", "--ckpt", str(ckpt), "--data", str(files / "text.txt"), "--out", out],
        "eval gsm8k": ["eval", "gsm8k", "--ckpt", str(ckpt), "--data", str(files / "test.jsonl"), "--shots", "0",
                       "--out", out],
        "eval mc": ["eval", "mc", "--ckpt", str(ckpt), "--data", str(files / "mc.jsonl"), "--out", out],
        "eval harness": ["eval", "harness", "--ckpt", str(ckpt), "--tasks", "some_task", "--out", out],
        "generate": ["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"],
        "serve": ["serve", "--ckpt", str(ckpt)],
        "bank add": ["bank", "add", "--ckpt", str(ckpt), str(files / "text.txt")],
        "report": ["report", str(files / "run"), "--out", out],
        "info": ["info", str(ckpt)],
    }[verb]


@pytest.mark.parametrize("verb", ALL_VERBS)
def test_every_verb_refuses_bad_input_in_one_line(verb, files, capsys):
    args = _verb_args(verb, files, files / "ckpt")
    _error(capsys, [*args, "--no-such-option", "1"], "--no-such-option")
    _error(capsys, [*args, "--config", str(files / "bad.yaml")], "not valid YAML")
    _error(capsys, [*args, "--config", str(files / "missing.yaml")], "does not exist")
    if verb in ("report", "info", "train"):
        return
    missing = _verb_args(verb, files, files / "no-such-ckpt")
    _error(capsys, missing, "no-such-ckpt", "does not exist")
    if verb == "eval harness":
        pytest.importorskip("lm_eval")
    _error(capsys, _verb_args(verb, files, files / "other-base"), "made for base", "hidden_size")


def test_inputs_that_only_some_verbs_take(files, capsys):
    ckpt = str(files / "ckpt")
    _error(capsys, ["train"], "--config")  # no silent default run
    _error(capsys, ["train", "--config", TINY, "--train.max_step", "3"], "unknown config key", "train.max_step")
    _error(capsys, ["train", "--config", TINY, "--data.source", str(files / "nowhere")], "matches no file")
    _error(capsys, ["eval", "--ckpt", ckpt, "--limit", "2"], "--limit is an option of", "eval gsm8k", "eval ahead")
    _error(capsys, ["eval", "gsm8k", "--ckpt", ckpt, "--out", "o", "--data", str(files / "none.jsonl")], "does not exist")
    _error(capsys, ["eval", "gsm8k", "--ckpt", ckpt, "--out", "o", "--data", str(files / "test.jsonl"), "--shots",
                    "2", "--train-file", str(files / "none.jsonl")], "no training file")
    _error(capsys, ["eval", "mc", "--ckpt", ckpt, "--out", "o", "--data", str(files / "test.jsonl")], "line 1")
    _error(capsys, ["eval", "perplexity", "--ckpt", ckpt, "--out", "o", "--data", str(files / "nothing")], "matches no file")
    _error(capsys, ["generate", "--ckpt", ckpt, "--prompt", ""], "prompt")
    _error(capsys, ["generate", "--ckpt", ckpt, "--prompt", "x" * 2100], "context")
    _error(capsys, ["generate", "--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "many"], "integer", "many")
    _error(capsys, ["bank", "add", "--ckpt", ckpt, str(files / "none.txt")], "does not exist")
    _error(capsys, ["report", str(files / "none"), "--out", "o"], "does not exist")
    _error(capsys, ["report", str(files / "run"), "--out", "o"], "no evaluation JSON")
    _error(capsys, ["info", str(files)], "not a cacheaug checkpoint")
    _error(capsys, ["frobnicate"], "invalid choice")


def test_a_missing_extra_names_its_pip_command(files, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    _error(capsys, ["serve", "--ckpt", str(files / "ckpt")], "pip install -e '.[serve]'")


def test_help_and_argument_errors_do_not_import_torch(files):
    script = ("import sys; from cacheaug.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    for argv in (["train", "--no-such"], ["generate", "--ckpt", str(files / "none"), "--prompt", "hi"],
                 ["eval", "gsm8k", "--ckpt", str(files / "ckpt"), "--out", "o", "--data", str(files / "none.jsonl")],
                 ["info", str(files / "ckpt")]):
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
        assert done.stdout.split()[-3:] == ["2" if argv[0] != "info" else "0", "False", "False"], (argv, done)
    for argv in (["--help"], ["train", "--help"], ["eval", "gsm8k", "--help"]):
        done = subprocess.run([sys.executable, "-m", "cacheaug.cli", *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage: cacheaug" in done.stdout
    assert "--train.max_steps" in done.stdout or "--shots" in done.stdout
