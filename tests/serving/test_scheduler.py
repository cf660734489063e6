"""The continuous-batching decode loop: requests decoded together, joining and leaving mid-batch, equal each
decoded alone (stream.Generation, and a cacheless recompute); cancellation, timeouts, backpressure and faults."""

from __future__ import annotations

import time

import pytest
import torch

import helpers
from cacheaug.serving.scheduler import ErrorEvent, QueueFull, Sampling, Scheduler
from cacheaug.state import padded_batches_are_exact
from cacheaug.stream import FinishEvent, Generation, TokenEvent

# (mode, max_tokens, reaugment_every, temperature): one of each kind, ending at different steps
REQUESTS = [("off", 7, None, 0.0), ("sync", 12, 4, 0.0), ("async", 9, None, 0.0), ("sync", 5, None, 0.0),
            ("off", 10, None, 0.0), ("sync", 11, None, 0.8)]
JOIN_AFTER = 3  # the last three requests are submitted once the first has made this many tokens


def _drain(ticket):
    events = list(ticket.events(timeout=60))
    assert isinstance(events[-1], FinishEvent), events[-1]
    return events


def _solo(lm, prompt, mode, max_tokens, reaugment_every, temperature, seed, insertions):
    """The request decoded alone by stream.Generation; an async request's latents go in where the batch put them."""
    delay = None
    if mode == "async":  # inserted when the background pass was ready: the same point, fixed
        mode, delay = ("async", insertions[0]) if insertions else ("off", None)
    return list(Generation(lm, torch.tensor([prompt]), max_tokens, augment=mode, async_delay_tokens=delay,
                           reaugment_every=reaugment_every, do_sample=temperature > 0,
                           temperature=temperature or 1.0, seed=seed))


@pytest.mark.parametrize("arch", helpers.ARCHITECTURES)
def test_requests_decoded_together_equal_each_decoded_alone(arch):
    lm = helpers.perturbed_lm(arch, num_latents=3)
    scheduler = Scheduler(lm, None, max_batch=8)
    try:
        assert scheduler.batched == padded_batches_are_exact(lm.base.config)
        prompts = [helpers.prompt_ids(1, 5 + 3 * i, seed=i)[0].tolist() for i in range(len(REQUESTS))]

        def submit(i):
            mode, max_tokens, every, temperature = REQUESTS[i]
            return scheduler.submit(prompts[i], Sampling(max_tokens, temperature, seed=i, augment=mode,
                                                         reaugment_every=every))

        tickets = [submit(i) for i in range(3)]
        first = tickets[0].events(timeout=60)
        started = [next(first) for _ in range(JOIN_AFTER)]  # the batch is running when the others join
        tickets += [submit(i) for i in range(3, len(REQUESTS))]
        results = [started + list(first)] + [_drain(t) for t in tickets[1:]]
    finally:
        scheduler.close()
    for i, events in enumerate(results):
        finish, tokens = events[-1], [e for e in events if isinstance(e, TokenEvent)]
        mode, max_tokens, every, temperature = REQUESTS[i]
        alone = _solo(lm, prompts[i], mode, max_tokens, every, temperature, i, finish.insertions)
        assert finish.token_ids == alone[-1].token_ids, (arch, i)
        assert finish.insertions == alone[-1].insertions and finish.augmentation == alone[-1].augmentation
        assert len(finish.token_ids) == max_tokens  # no eos here: every request ran to its own length
        expected = torch.stack([e.logits for e in alone if isinstance(e, TokenEvent)])
        torch.testing.assert_close(torch.stack([e.logits for e in tokens]), expected, atol=1e-4, rtol=1e-4)
    sync = REQUESTS.index(("sync", 12, 4, 0.0))
    assert results[sync][-1].insertions == [0, 4, 8]


@torch.no_grad()
def test_batched_logits_equal_a_cacheless_recompute():
    """Against the definition, not only another decoder: one forward over prompt, latents and tokens."""
    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None)
    prompts = [helpers.prompt_ids(1, n, seed=n)[0].tolist() for n in (6, 11, 8)]
    try:
        tickets = [scheduler.submit(p, Sampling(8, augment="sync", reaugment_every=5)) for p in prompts]
        results = [_drain(t) for t in tickets]
    finally:
        scheduler.close()
    for prompt, events in zip(prompts, results):
        finish = events[-1]
        alone = Generation(lm, torch.tensor([prompt]), 8, augment="sync", reaugment_every=5)
        list(alone)
        reference = helpers.full_recompute(lm, torch.tensor([prompt]), finish.token_ids, finish.insertions, alone.latents)
        got = torch.stack([e.logits for e in events if isinstance(e, TokenEvent)])
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


def _wait(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_a_cancelled_request_frees_its_row_at_the_next_step(monkeypatch):
    import cacheaug.serving.scheduler as module

    real = module.feed_token

    def slow(*arguments):  # 20 ms steps: the test's polling is fast against them
        time.sleep(0.02)
        real(*arguments)

    monkeypatch.setattr(module, "feed_token", slow)
    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None)
    try:
        long = scheduler.submit(helpers.prompt_ids(1, 6)[0].tolist(), Sampling(500, augment="off"))
        other = scheduler.submit(helpers.prompt_ids(1, 7, seed=3)[0].tolist(), Sampling(40, augment="sync"))
        events = long.events(timeout=60)
        next(events), next(events)
        long.cancel()
        steps = scheduler.counters["steps"]
        _wait(lambda: scheduler.active_rows <= 1)
        assert scheduler.counters["steps"] - steps <= 2  # gone within a step (one may have been under way)
        rest = list(events)
        assert isinstance(rest[-1], ErrorEvent) and rest[-1].status == 499
        assert isinstance(_drain(other)[-1], FinishEvent)  # the others carry on
        assert scheduler.counters["cancelled"] == 1
    finally:
        scheduler.close()


def test_a_full_queue_refuses():
    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None, max_batch=1, max_queue=1)
    try:
        running = scheduler.submit([5, 6, 7], Sampling(100_000, augment="off"))
        next(running.events(timeout=60))  # decoding: the only row is taken
        waiting = scheduler.submit([5, 6], Sampling(2, augment="off"))
        with pytest.raises(QueueFull):
            scheduler.submit([5], Sampling(2, augment="off"))
        assert scheduler.counters["rejected"] == 1 and scheduler.queue_depth == 1
        running.cancel()
        assert isinstance(_drain(waiting)[-1], FinishEvent)  # admitted once the row was free
    finally:
        scheduler.close()


def test_a_request_past_its_timeout_ends_with_504():
    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None, request_timeout_s=0.3)
    try:
        events = list(scheduler.submit([5, 6, 7], Sampling(100_000, augment="off")).events(timeout=60))
        assert isinstance(events[-1], ErrorEvent) and events[-1].status == 504
        assert "longer than 0.3 s" in events[-1].message
        _wait(lambda: scheduler.active_rows == 0)  # answered first, dropped in the same step
        assert scheduler.counters["timed_out"] == 1
    finally:
        scheduler.close()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(monkeypatch):
    import cacheaug.serving.scheduler as module

    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None)
    real = module.feed_token
    try:
        monkeypatch.setattr(module, "feed_token", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
        failed = list(scheduler.submit([4, 5, 6], Sampling(5, augment="sync")).events(timeout=60))
        assert isinstance(failed[-1], ErrorEvent) and failed[-1].status == 500 and "out of memory" in failed[-1].message
        monkeypatch.setattr(module, "feed_token", real)
        assert isinstance(_drain(scheduler.submit([4, 5, 6], Sampling(5)))[-1], FinishEvent)
        assert scheduler.counters["failed"] == 1
    finally:
        scheduler.close()


def test_a_broken_coprocessor_leaves_requests_unaugmented(monkeypatch):
    lm = helpers.perturbed_lm("llama", num_latents=3)
    scheduler = Scheduler(lm, None)
    prompt = [9, 8, 7, 6]
    try:
        plain = _drain(scheduler.submit(prompt, Sampling(6, augment="off")))[-1]
        monkeypatch.setattr(lm.coprocessor, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
        for mode in ("sync", "async"):
            finish = _drain(scheduler.submit(prompt, Sampling(6, augment=mode)))[-1]
            assert finish.augmentation == "failed: RuntimeError: broken" and finish.insertions == []
            assert finish.token_ids == plain.token_ids
    finally:
        scheduler.close()


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(Exception, match="augment must be one of"):
        Sampling(4, augment="later")
    with pytest.raises(Exception, match="max_tokens must be >= 1"):
        Sampling(0)
