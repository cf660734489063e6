"""End to end through the CLI on the tiny random model: every verb, files written, numbers logged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from cacheaug.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", TINY, "--train.output_dir", str(out), *extra])


def test_train_eval_generate_info(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    validation = [r for r in records if r.get("split") == "validation"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train_records)
    assert [r["step"] for r in validation] == [2, 4]
    assert len(validation[-1]["nll_by_offset_augmented"]) == 3 and validation[-1]["num_tokens"] > 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000004"]
    checkpoint = out / "step-000004"
    assert {p.name for p in checkpoint.iterdir()} == {"coprocessor.safetensors", "cacheaug_config.json", "trainer_state.pt"}
    assert (out / "curves.png").stat().st_size > 1000
    final = json.loads((out / "final_eval.json").read_text())
    assert final["step"] == 4 and final["loss_augmented"] == validation[-1]["loss_augmented"]
    assert "ppl augmented" in capsys.readouterr().out

    assert main(["eval", "--ckpt", str(checkpoint), "--batches", "2", "--batch-size", "2", "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert math.isfinite(evaluated["loss_augmented"]) and math.isfinite(evaluated["loss_base"])
    assert "offset" in capsys.readouterr().out

    from cacheaug import AugmentedLM, load_base

    base, tokenizer = load_base("tiny-random")
    lm = AugmentedLM.from_pretrained(checkpoint, base=base)
    prompt = tokenizer("Question: Tom has 3", return_tensors="pt").input_ids
    for flags, augment in (([], True), (["--no-augment"], False)):
        assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "Question: Tom has 3",
                     "--max-new-tokens", "6", *flags]) == 0
        tokens = lm.generate(prompt, 6, augment=augment, eos_token_id=tokenizer.eos_token_id)[0, prompt.shape[1]:]
        assert capsys.readouterr().out == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"

    assert main(["info", str(checkpoint)]) == 0
    info = capsys.readouterr().out
    assert "tiny-random" in info and "trainable params" in info and "num_latents       2" in info


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert _train(tmp_path / "r1", "--data.source", str(empty)) == 2
    _one_line_error(capsys, "empty")

    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": "ab"}) for _ in range(20)))
    assert _train(tmp_path / "r2", "--data.source", str(short)) == 2
    _one_line_error(capsys, "shorter than")

    assert _train(tmp_path / "r3", "--train.max_step", "3") == 2
    _one_line_error(capsys, "unknown config key", "train.max_step")

    assert _train(tmp_path / "r4", "--coprocessor.num_latents", "0") == 2
    _one_line_error(capsys, "num_latents", "0")

    no_field = tmp_path / "rows.jsonl"
    no_field.write_text("\n".join(json.dumps({"body": "some longer text " * 5}) for _ in range(20)))
    assert _train(tmp_path / "r5", "--data.source", str(no_field), "--data.format", "jsonl") == 2
    _one_line_error(capsys, "text", "body")


def test_checkpoint_and_run_folder_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out) == 0
    capsys.readouterr()
    metrics_before = (out / "metrics.jsonl").read_text()

    assert _train(out) == 2  # another run lives there
    _one_line_error(capsys, "holds another run", "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == metrics_before

    other_base = out / "step-000002"
    description = json.loads((other_base / "cacheaug_config.json").read_text())
    description["coprocessor"]["base_identity"]["hidden_size"] = 128
    (other_base / "cacheaug_config.json").write_text(json.dumps(description))
    assert main(["eval", "--ckpt", str(other_base)]) == 2
    _one_line_error(capsys, "made for base", "hidden_size")

    weights = out / "step-000004" / "coprocessor.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["generate", "--ckpt", str(out / "step-000004"), "--prompt", "hi"]) == 2
    _one_line_error(capsys, "damaged or truncated")

    assert main(["info", str(tmp_path)]) == 2
    _one_line_error(capsys, "not a cacheaug checkpoint")

    assert _train(out, "--overwrite") == 0  # explicit overwrite replaces the run


def test_bf16_autocast_and_accumulation_run(tmp_path):
    out = tmp_path / "bf16"
    assert _train(out, "--train.precision", "bf16", "--train.grad_accum", "2", "--train.max_steps", "2",
                  "--train.eval_every", "0", "--train.save_every", "0") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
