"""`cacheaug report`: Markdown tables and plots from the JSON files `cacheaug eval` writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cacheaug.cli import main
from cacheaug.eval.gsm8k import Gsm8kEval
from cacheaug.eval.mc import McEval
from cacheaug.eval.metrics import PositionEval
from cacheaug.eval.report import load_run, write_report


def _run_folder(root: Path, name: str, method: str, num_latents: int, gain: float, gsm8k: float | None) -> Path:
    """A run folder as `cacheaug eval` leaves it: perplexity on two datasets, GSM8K, MC."""
    folder = root / name
    folder.mkdir(parents=True)
    meta = {"checkpoint": f"runs/{name}/step-000010", "base_model": "tiny-random", "method": method,
            "num_latents": num_latents, "num_ahead": 16, "step": 10}
    base = [math.log(20.0 - 0.1 * k) for k in range(32)]
    for dataset in ("prose-test", "wikitext2-test"):
        result = PositionEval(
            nll_augmented=[nll - gain / (k + 1) for k, nll in enumerate(base)], nll_base=base,
            tokens_by_offset=[100] * 32, num_sequences=4, seq_len=256, every=8, num_points=100,
        )
        (folder / f"perplexity-{dataset}.json").write_text(json.dumps({
            "kind": "perplexity", "name": dataset, "run": meta, "settings": {"data": f"data/{dataset}"},
            "result": result.to_dict(),
        }))
    if gsm8k is not None:
        result = Gsm8kEval(gsm8k, 0.2, gsm8k - 0.01, 0.19, num_items=250, shots=8, cot=False)
        (folder / "gsm8k-8shot.json").write_text(json.dumps({"kind": "gsm8k", "name": "gsm8k-8shot", "run": meta,
                                                              "result": result.to_dict()}))
    mc = McEval(0.5, 0.75, 0.25, 0.5, num_items=4)
    (folder / "mc-items.json").write_text(json.dumps({"kind": "mc", "name": "items", "run": meta, "result": mc.to_dict()}))
    (folder / "notes.json").write_text(json.dumps({"something": "else"}))  # not an evaluation: ignored
    return folder


def test_report_writes_markdown_tables_and_plots(tmp_path, capsys):
    runs = [
        _run_folder(tmp_path, "nl4", "coprocessor", 4, 0.02, 0.22),
        _run_folder(tmp_path, "nl16", "coprocessor", 16, 0.05, 0.25),
        _run_folder(tmp_path, "pause16", "pause", 16, -0.01, None),
    ]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out
    assert "### Perplexity by position: prose-test" in text and "### Perplexity by position: wikitext2-test" in text
    assert "| plain base | no latents | 20.000 |" in text
    expected = 100 * (math.exp(-0.05) - 1)
    assert f"| nl16 | coprocessor, N_L=16, step 10 | {20 * math.exp(-0.05):.3f} ({expected:+.2f}%)" in text
    # last column: every scored token of every offset; equal counts, so exp(-gain * mean 1/k) vs the base
    overall_base = math.exp(sum(math.log(20.0 - 0.1 * k) for k in range(32)) / 32)
    change = math.exp(-0.05 * sum(1 / (k + 1) for k in range(32)) / 32)
    assert "| k=1..32 |" in text and f"| {overall_base:.3f} |" in text
    assert f"| {overall_base * change:.3f} ({100 * (change - 1):+.2f}%) |" in text
    assert "| nl4 | coprocessor, N_L=4, step 10 | 8-shot | 250 | 22.00 | 20.00 | +2.00 |" in text
    assert "pause16" in text and "| nl16 | items | 4 | 50.00 | 25.00 | 75.00 | 50.00 |" in text
    for png in ("perplexity-prose-test.png", "perplexity-wikitext2-test.png", "gsm8k.png", "scaling.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text


def test_gsm8k_runs_without_a_base_condition_borrow_the_plain_base_run(tmp_path):
    def gsm8k_only(name: str, method: str, num_latents, aug, base) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        meta = {"method": method, "num_latents": num_latents, "step": None if method == "base" else 10}
        result = Gsm8kEval(aug, base, aug, base, num_items=250, shots=8, cot=False)
        (folder / "gsm8k-8shot.json").write_text(json.dumps({"kind": "gsm8k", "name": "gsm8k-8shot", "run": meta,
                                                              "result": result.to_dict()}))
        return folder

    runs = [gsm8k_only("base", "base", None, None, 0.02), gsm8k_only("nl16", "coprocessor", 16, 0.03, None),
            gsm8k_only("nl64", "coprocessor", 64, 0.05, None)]
    text = write_report(runs, tmp_path / "out").read_text()
    assert "| base | plain base, no latents | 8-shot | 250 | - | 2.00 |" in text
    assert "| nl16 | coprocessor, N_L=16, step 10 | 8-shot | 250 | 3.00 | 2.00* | +1.00 |" in text
    assert "plain base measured in base" in text
    assert (tmp_path / "out" / "scaling.png").is_file() and (tmp_path / "out" / "gsm8k.png").is_file()


def test_report_reads_runs_and_refuses_empty_folders(tmp_path, capsys):
    run = load_run(_run_folder(tmp_path, "nl8", "coprocessor", 8, 0.03, 0.3))
    assert (run.label, run.method, run.num_latents, run.step) == ("nl8", "coprocessor", 8, 10)
    assert sorted(run.files["perplexity"]) == ["prose-test", "wikitext2-test"] and "gsm8k-8shot" in run.files["gsm8k"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no evaluation JSON" in capsys.readouterr().err
    # a single run: tables and per-dataset plots, no scaling plot
    path = write_report([tmp_path / "nl8"], tmp_path / "single")
    assert path.is_file() and not (tmp_path / "single" / "scaling.png").exists()
