"""GSM8K: answer extraction, prompts in the training corpus's format, the shared exemplar cache, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug.config import PAPER_RECIPE
from cacheaug import gsm8k
from cacheaug.cli import main
from cacheaug.corpus import render_document
from cacheaug.evaluate import context_state, encode, generate_until
from cacheaug.gsm8k import (
    COT_TRIGGER,
    SharedPrefix,
    choose_exemplars,
    evaluate_gsm8k,
    exemplar_block,
    extract_answer,
    gold_answer,
    question_prompt,
    same_number,
)
from test_evaluate import trained_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared/data, as in configs/

TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "5 pens cost 5 * 2 = <<5*2=10>>10 dollars.\n#### 10"},
    {"question": "Mia read 1,200 pages in 3 days. Pages per day?", "answer": "1,200 / 3 = <<1200/3=400>>400.\n#### 400"},
]
TEST = [
    {"question": "Janet's ducks lay 16 eggs. She eats 3. How many are left?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
    {"question": "What is 1,000 + 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 42", 42), ("so the total is\n#### 1,234", 1234), ("She pays $5 in all.", 5), ("It costs 3.50", 3.5),
        ("The change is -7", -7), ("The answer is 12.", 12), ("the answer is: $1,000.", 1000),
        ("#### -$3.25", -3.25), ("First 2 + 3 = 5, then 5 * 2 = 10.", 10), ("no number here", None), ("", None),
        ("#### 18\n\nQuestion: 99 ducks", 18),  # the marked answer wins over a later number
    ],
)
def test_extract_answer_formats(text, expected):
    value = extract_answer(text)
    assert value is None if expected is None else value == pytest.approx(expected)


def test_strict_extraction_gold_and_numeric_comparison():
    assert extract_answer("She made 18 dollars.", strict=True) is None
    assert extract_answer("The answer is 18", strict=True) == 18
    assert gold_answer("work\n#### 1,234") == 1234
    assert same_number(3.5, gold_answer("#### 3.50")) and same_number(7.0, 7)
    assert not same_number(None, 7) and not same_number(7.01, 7)
    from cacheaug.data import DataError

    with pytest.raises(DataError):
        gold_answer("no final line")


def test_prompts_follow_the_training_corpus_format():
    block = exemplar_block(choose_exemplars(TRAIN, 2))
    first = render_document(TRAIN[0]["question"], "Tom has 3 + 4 = 7 apples.", 7)
    assert block.startswith(first + "\n\nQuestion: A pen costs $2.")
    assert "<<" not in block and block.endswith("#### 10\n\n")
    assert question_prompt(TEST[0]["question"]) == f"Question: {TEST[0]['question']}\nAnswer:"
    assert question_prompt("Q?", cot=True) == f"Question: Q?\nAnswer: {COT_TRIGGER}"
    assert exemplar_block([]) == ""
    drawn = choose_exemplars(TRAIN, 2, seed=5)
    assert drawn == choose_exemplars(TRAIN, 2, seed=5) and len(drawn) == 2


@torch.no_grad()
def test_shared_exemplar_cache_equals_reading_the_whole_prompt():
    base, tokenizer = load_base("tiny-random")
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3)).eval()
    block = exemplar_block(TRAIN)
    shared = SharedPrefix(lm, tokenizer, block)
    ids = encode(tokenizer, block + question_prompt(TEST[0]["question"]))
    rest, cache = shared.split(ids)
    assert cache is not None and len(rest) < len(ids)
    for augment in (True, False):
        whole = context_state(lm, ids, augment)
        split = context_state(lm, rest, augment, cache)
        assert whole.next_position == split.next_position
        torch.testing.assert_close(split.logits, whole.logits, rtol=1e-4, atol=1e-4)
        assert generate_until(lm, tokenizer, whole, 6) == generate_until(lm, tokenizer, split, 6)
    # a prompt that does not start with the shared ids is read in full
    assert shared.split(encode(tokenizer, "Question: other"))[1] is None


def test_accuracy_bookkeeping_with_canned_generations(monkeypatch):
    base, tokenizer = load_base("tiny-random")
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3)).eval()
    canned = {
        (0, True): " 16 - 3 = 13 eggs.\n#### 13", (0, False): " She has 12 left.",
        (1, True): " The answer is $1,234.", (1, False): " It is 1,234 and then 5",
    }
    calls = []

    def fake_generate(lm_, tokenizer_, contexts, augment, cache, max_new_tokens, stop, async_delay):
        assert cache is not None  # both prompts continue the shared exemplar cache
        calls.append((len(contexts), augment))
        return [canned[(index, augment)] for index in range(len(contexts))]

    monkeypatch.setattr(gsm8k, "generate_batch", fake_generate)
    streamed = []
    result, records = evaluate_gsm8k(lm, tokenizer, TEST, choose_exemplars(TRAIN, 2), on_record=streamed.append)
    assert calls == [(2, True), (2, False)] and streamed == records
    assert [(r["index"], r["augmented"]) for r in records] == [(0, True), (0, False), (1, True), (1, False)]
    assert result.accuracy_augmented == 1.0 and result.accuracy_base == 0.0
    assert result.strict_accuracy_augmented == 1.0 and result.strict_accuracy_base == 0.0
    assert [r["extracted"] for r in records] == [13, 12, 1234, 5]
    assert records[0]["prompt"].endswith(question_prompt(TEST[0]["question"])) and records[0]["gold"] == 13
    assert result.shots == 2 and result.num_items == 2 and "augmented | 100.00" in result.table()


def test_generation_stops_at_stop_sequences_and_eos():
    base, tokenizer = load_base("tiny-random")
    base.lm_head = _biased_head(base.lm_head, ord("z"))  # greedy decoding writes "zzzz..."
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3)).eval()
    prompt = encode(tokenizer, "Question: hi")
    state = context_state(lm, prompt, True)
    start = state.next_position
    assert generate_until(lm, tokenizer, state, 7, ["Q"]) == "z" * 7
    assert state.next_position == start + 6  # the last token is returned, not fed
    state = context_state(lm, prompt, True)
    assert generate_until(lm, tokenizer, state, 20, ["\n\n", "zzz"]) == ""  # cut before the stop sequence
    assert state.next_position == start + 2
    base.lm_head = _biased_head(base.lm_head, tokenizer.eos_token_id, 100.0)
    assert generate_until(lm, tokenizer, context_state(lm, prompt, False), 20) == ""


def _byte_vocab_base(arch: str):
    """A tiny random ``arch`` model over the byte tokenizer's 257 ids (256 = eos)."""
    from transformers import AutoModelForCausalLM

    from conftest import _configs

    config = _configs()[arch]
    config.vocab_size, config.eos_token_id = 257, 256
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("recipe", ["paper", "token_gate"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "gemma3", "mistral"])
@torch.no_grad()
def test_batched_generation_equals_one_by_one(arch, recipe):
    # Padded rows of different lengths on the shared exemplar cache give the texts and logits of each prompt
    # decoded alone: plain, augmented, and with the latents delayed by 2 tokens (as the async Generation).
    from cacheaug.evaluate import cut_at_stop, generate_until_batch, padded_batches_are_exact, padded_context_states
    from cacheaug.generate import generate_text
    from cacheaug.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    options = PAPER_RECIPE if recipe == "paper" else {"readout": "token", "latent_gate": True}
    lm = AugmentedLM(_byte_vocab_base(arch), CoprocessorConfig(num_latents=3, num_ahead=3, **options)).eval()
    for parameter in lm.coprocessor.parameters():  # a coprocessor that is not the base's copy
        parameter.add_(0.05 * torch.randn_like(parameter))
    exact = padded_batches_are_exact(lm.base.config)
    assert exact == (arch in ("llama", "gpt2", "qwen3"))
    prefix = encode(tokenizer, "Question: shared exemplars.\n\n")
    shared = lm.prefill(torch.tensor([prefix])).cache
    contexts = [encode(tokenizer, text) for text in ("Q: a?", "Question: a longer one here?", "Q?", "Question: mid")]
    batches = [contexts] if exact else [[context] for context in contexts]
    alone = [generate_until(lm, tokenizer, context_state(lm, ids, False, shared), 14) for ids in contexts]
    # a stop string the rows reach at different steps (or never), so finished rows leave the batch mid-way
    candidates = sorted({char for text in alone for char in text if char != "\ufffd"})
    stop = next([char] for char in candidates if len({len(cut_at_stop(text, [char])) for text in alone}) > 1)
    for augment, delay in ((False, None), (True, None), (True, 2)):
        got = []
        for batch in batches:
            state = padded_context_states(lm, batch, augment, shared, delay=delay)
            if delay is None:
                for row, ids in enumerate(batch):
                    single = context_state(lm, ids, augment, shared)
                    assert int(state.next_position[row]) == single.next_position
                    torch.testing.assert_close(state.logits[row], single.logits[0], rtol=1e-4, atol=1e-5)
            got += generate_until_batch(lm, tokenizer, state, 14, stop)
        if delay is None:
            expected = [generate_until(lm, tokenizer, context_state(lm, ids, augment, shared), 14, stop) for ids in contexts]
        else:
            from cacheaug.coprocessor import AugmentedCache

            expected = []
            for ids in contexts:
                context = AugmentedCache(shared, len(prefix), torch.zeros(1, 257))
                expected.append(generate_text(
                    lm, torch.tensor([ids]), 14, augment="async", async_delay_tokens=delay, stop=stop,
                    tokenizer=tokenizer, context=context, eos_token_id=tokenizer.eos_token_id,
                ).text)
        assert got == expected, (augment, delay)
        if not augment:
            assert got == [cut_at_stop(text, stop) for text in alone]


def _biased_head(head, token: int, bias: float = 30.0):
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(head.bias if head.bias is not None else torch.zeros(head.out_features))
        biased.bias[token] += bias
    return biased.requires_grad_(False)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_cli_gsm8k_end_to_end(checkpoint, tmp_path, capsys):
    data = tmp_path / "gsm"
    data.mkdir()
    _write(data / "train.jsonl", TRAIN)
    test = _write(data / "test.jsonl", TEST)
    out = tmp_path / "eval"
    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(test), "--shots", "2",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    summary = json.loads((out / "gsm8k-2shot.json").read_text())
    assert summary["kind"] == "gsm8k" and summary["result"]["num_items"] == 2 and summary["settings"]["shots"] == 2
    made_by = summary["provenance"]
    assert made_by["command"].startswith("cacheaug eval gsm8k --ckpt ") and "--shots 2" in made_by["command"]
    assert len(made_by["git_commit"] or "0" * 40) == 40 and made_by["machine"]["cpus"] >= 1
    records = [json.loads(line) for line in (out / "gsm8k-2shot.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["augmented"] for r in records} == {True, False}
    assert all({"prompt", "output", "extracted", "gold", "correct"} <= set(r) for r in records)
    assert "GSM8K 2-shot" in capsys.readouterr().out

    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(test), "--shots", "0", "--cot",
                 "--limit", "1", "--max-new-tokens", "4", "--conditions", "augmented", "--out", str(out)]) == 0
    cot = json.loads((out / "gsm8k-0shot-cot.json").read_text())["result"]
    assert cot["cot"] and cot["num_items"] == 1 and cot["accuracy_base"] is None
    first = json.loads((out / "gsm8k-0shot-cot.jsonl").read_text().splitlines()[0])
    assert first["prompt"].endswith(COT_TRIGGER)

    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(test), "--shots", "2", "--batch-size", "1",
                 "--async-delay", "2", "--max-new-tokens", "5", "--conditions", "augmented", "--out", str(out)]) == 0
    delayed = json.loads((out / "gsm8k-2shot-async2.json").read_text())
    assert delayed["settings"]["async_delay"] == 2 and delayed["settings"]["batch_size"] == 1
    assert all(json.loads(line)["async_delay"] == 2 for line in (out / "gsm8k-2shot-async2.jsonl").open())

    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(test), "--shots", "9",
                 "--out", str(out)]) == 2
    assert "9 shots" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(test), "--async-delay", "2",
                 "--conditions", "base", "--out", str(out)]) == 2
    assert "--async-delay needs" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "test.jsonl").is_file(), reason="shared data (gsm8k) not present")
def test_cli_gsm8k_on_the_real_files(checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "gsm8k", "--ckpt", str(checkpoint), "--data", str(SHARED / "test.jsonl"), "--shots", "8",
                 "--limit", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "gsm8k-8shot.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records[::2]] == [18, 3]
    assert records[0]["prompt"].count("\n#### ") == 8
