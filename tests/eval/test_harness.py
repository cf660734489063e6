"""The lm-evaluation-harness model `cacheaug`: same numbers as cacheaug's own scorer, and a local task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from cacheaug.cli import main  # noqa: E402
from cacheaug.eval.harness import CacheAugLM, run_harness  # noqa: E402
from cacheaug.eval.likelihood import context_state, encode  # noqa: E402
from cacheaug.eval.mc import evaluate_mc  # noqa: E402
from cacheaug.generate import generate_until  # noqa: E402
from helpers import MC_ITEMS as ITEMS  # noqa: E402
from helpers import biased_lm, trained_checkpoint  # noqa: E402

MORE = [
    {"context": "Question: 2 + 2 =", "choices": ["4", "5", "22"], "gold": 0},
    {"context": "The sky is ", "choices": ["blue", "green"], "gold": 0},  # trailing space moves to the choice
]


def _instance(request_type: str, args: tuple, index: int) -> Instance:
    return Instance(request_type=request_type, doc={}, arguments=args, idx=index)


@pytest.fixture(scope="module")
def model():
    return biased_lm()


@pytest.mark.parametrize("augment", [True, False])
def test_adapter_loglikelihoods_equal_our_scorer(model, augment):
    lm, tokenizer = model
    items = ITEMS + MORE
    adapter = CacheAugLM(lm=lm, tokenizer=tokenizer, augment=augment)
    requests = [
        _instance("loglikelihood", (item["context"], " " + choice), i)
        for item in items for i, choice in enumerate(item["choices"])
    ]
    theirs = [score for score, _ in adapter.loglikelihood(requests, disable_tqdm=True)]
    _, records = evaluate_mc(lm, tokenizer, items, conditions=(augment,))
    ours = [score for record in records for score in record["loglikelihoods"]]
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-6)


def test_augmentation_changes_the_adapter_scores(model):
    lm, tokenizer = model
    request = [_instance("loglikelihood", ("Question: 2 + 2 =", " 4"), 0)]
    augmented = CacheAugLM(lm=lm, tokenizer=tokenizer, augment="true").loglikelihood(request, disable_tqdm=True)
    plain = CacheAugLM(lm=lm, tokenizer=tokenizer, augment="false").loglikelihood(request, disable_tqdm=True)
    assert augmented[0][0] != plain[0][0]


def test_adapter_generation_equals_ours(model):
    lm, tokenizer = model
    adapter = CacheAugLM(lm=lm, tokenizer=tokenizer, augment=True)
    requests = [_instance("generate_until", ("Question: hi\nAnswer:", {"until": ["zzz"], "max_gen_toks": 5}), 0),
                _instance("generate_until", ("Question: hi\nAnswer:", {"until": ["\n"], "max_gen_toks": 5}), 1)]
    theirs = adapter.generate_until(requests, disable_tqdm=True)
    state = context_state(lm, encode(tokenizer, "Question: hi\nAnswer:"), True)
    assert theirs == ["", generate_until(lm, tokenizer, state, 5, ["\n"])] and theirs[1] == "z" * 5


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _local_task(folder: Path, name: str = "cacheaug_local_mc") -> Path:
    """A multiple-choice task over a local JSONL file: no network, lm-eval's `json` dataset builder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS + MORE))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return folder


def test_simple_evaluate_on_a_local_task_matches_cacheaug_mc(model, tmp_path):
    lm, tokenizer = model
    tasks = str(_local_task(tmp_path / "tasks"))
    results = run_harness(lm, tokenizer, ["cacheaug_local_mc"], include_path=tasks, include_defaults=False)
    ours, _ = evaluate_mc(lm, tokenizer, ITEMS + MORE)
    for condition, (acc, acc_norm) in {
        "augmented": (ours.acc_augmented, ours.acc_norm_augmented),
        "base": (ours.acc_base, ours.acc_norm_base),
    }.items():
        task = results[condition]["cacheaug_local_mc"]
        assert task["acc,none"] == pytest.approx(acc) and task["acc_norm,none"] == pytest.approx(acc_norm)


def test_cli_harness_end_to_end(tmp_path_factory, tmp_path):
    tasks = _local_task(tmp_path / "tasks")
    out = tmp_path / "eval"
    assert main(["eval", "harness", "--ckpt", str(trained_checkpoint(tmp_path_factory)), "--tasks", "cacheaug_local_mc",
                 "--include-path", str(tasks), "--local-tasks-only", "--limit", "3", "--conditions", "augmented",
                 "--out", str(out)]) == 0
    record = json.loads((out / "harness.json").read_text())
    assert record["kind"] == "harness" and record["run"]["num_latents"] == 2 and "base" not in record["result"]
    task = record["result"]["augmented"]["cacheaug_local_mc"]
    assert task["sample_len"] == 3 and 0.0 <= task["acc,none"] <= 1.0
