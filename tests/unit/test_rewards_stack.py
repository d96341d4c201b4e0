"""The reward stack: configuration, weighting, failures, time-outs and the worker pool."""

import logging
import time

import pytest

from r1mega.rewards.stack import RewardInput, RewardStack, StreamingScore

GOOD = " <think> 2 + 2 is 4 </think> <answer> 4 </answer>"
H = "rewards_helpers."


def sample(response: str = GOOD, i: int = 0, **kw) -> RewardInput:
    kw.setdefault("answer", "4")
    kw.setdefault("data_source", "arithmetic")
    return RewardInput(response=response, metadata={"i": i}, **kw)


def custom(fn: str, weight: float = 1.0, **kwargs) -> dict:
    return {"_target_": H + fn, "weight": weight, **kwargs}


# -- configuration -------------------------------------------------------------------------------

def test_unknown_component_names_it_and_the_known_ones():
    with pytest.raises(ValueError) as err:
        RewardStack({"accuracy": 1.0, "speling": 0.5}, num_workers=0)
    assert "speling" in str(err.value)
    assert all(name in str(err.value) for name in ("accuracy", "format", "language", "overlong"))


@pytest.mark.parametrize("kwargs, message", [
    ({"components": {"overlong": 1.0}}, "overlong_max_tokens"),
    ({"components": {"overlong": 1.0}, "overlong_max_tokens": 10, "overlong_cache_tokens": 11},
     "cache_tokens"),
    ({"components": {"language": 1.0}, "language": "tlh"}, "known: en, zh"),
    ({"components": {"format": 1.0}, "custom": {"format": custom("index_reward")}}, "built-in"),
    ({"components": {}, "custom": {"x": {"weight": 1.0}}}, "_target_"),
    ({"components": {"format": float("nan")}}, "finite"),
    ({"components": {"format": 1.0}, "timeout_s": 0}, "timeout_s"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardStack(num_workers=0, **kwargs)


def test_bad_target_fails_at_start_up():
    with pytest.raises(Exception, match="no_such_module"):
        RewardStack({}, custom={"x": {"_target_": "no_such_module.fn"}}, num_workers=0)


def test_omegaconf_custom_spec():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"idx": custom("index_reward", 2.0, offset=0.5)})
    stack = RewardStack({}, custom=cfg, num_workers=0)
    assert stack.score([sample(i=1)]).total == [3.0]


def test_a_worker_that_cannot_start_fails_at_construction():
    with pytest.raises(RuntimeError, match="cannot build this reward"):
        RewardStack({}, custom={"x": custom("BrokenInit")}, num_workers=1)


# -- in-process scoring (num_workers=0) ------------------------------------------------------------

def test_weights_combine():
    stack = RewardStack({"accuracy": 1.0, "format": 0.5, "language": 0.25, "overlong": 2.0},
                        custom={"idx": custom("index_reward", 0.1, offset=10.0),
                                "const": custom("Constant", -1.0, value=0.75)},
                        num_workers=0, overlong_max_tokens=100, overlong_cache_tokens=20)
    samples = [sample(GOOD, i=1, response_tokens=10),
               sample("<answer>5</answer>", i=2, response_tokens=90),
               sample("<think>数学</think><answer>4</answer>", i=3, response_tokens=101)]
    out = stack.score(samples)
    assert out.components == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 0.0, 1.0],
                              "language": [1.0, 1.0, 0.0], "overlong": [0.0, -0.5, -1.0],
                              "idx": [11.0, 12.0, 13.0], "const": [0.75, 0.75, 0.75]}
    assert out.total == pytest.approx([1 + 0.5 + 0.25 + 0 + 1.1 - 0.75,
                                       0 + 0 + 0.25 - 1.0 + 1.2 - 0.75,
                                       1 + 0.5 + 0 - 2.0 + 1.3 - 0.75])
    assert (out.failures, out.timeouts) == (0, 0)
    assert stack.score([]).total == []


def test_in_process_timer_stops_python_loops():
    stack = RewardStack({"format": 1.0}, custom={"sleepy": custom("sleep_in_python"),
                                                 "greedy": custom("swallow_and_sleep", 0.0)},
                        timeout_s=1.0, num_workers=0)  # the loops never end; good samples need ms
    out = stack.score([sample(GOOD, i=1), sample("sleep", i=2)])
    assert out.components["sleepy"] == [1.0, 0.0]
    assert out.components["greedy"] == [0.0, 0.0]  # swallowing Exception does not hide the time-out
    assert out.components["format"] == [1.0, 0.0]
    assert out.timeouts == 3 and out.failures == 0


def test_failures_are_counted_and_logged_briefly(caplog):
    stack = RewardStack({"format": 1.0}, custom={"boom": custom("boom"), "nan": custom("not_a_number")},
                        num_workers=0)
    caplog.clear()  # the in-process warning of the set-up
    with caplog.at_level(logging.WARNING, logger="r1mega.rewards"):
        out = stack.score([sample(), sample()])
    assert out.failures == 4 and out.timeouts == 0
    assert out.components == {"format": [1.0, 1.0], "boom": [0.0, 0.0], "nan": [0.0, 0.0]}
    records = [r for r in caplog.records if r.name == "r1mega.rewards"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "boom" in records[0].getMessage() and len(records[0].getMessage()) < 1000


# -- worker processes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hang_stack():
    with RewardStack({"format": 1.0}, custom={"idx": custom("hang_in_c")}, timeout_s=1.0,
                     num_workers=2) as stack:
        yield stack


def test_hard_deadline_kills_a_worker_stuck_in_c(hang_stack):
    samples = [sample(GOOD, i=i) for i in range(12)]
    samples[3] = sample(GOOD + " hang", i=3)
    start = time.monotonic()
    out = hang_stack.score(samples)
    assert time.monotonic() - start < 500  # killed at its deadline (4 s), not after its 1000 s sleep
    expected = [float(i) for i in range(12)]
    expected[3] = 0.0
    assert out.components["idx"] == expected  # in input order, nothing lost
    assert out.components["format"] == [1.0] * 3 + [0.0] + [1.0] * 8
    assert out.total == [v + f for v, f in zip(expected, out.components["format"], strict=True)]
    assert (out.timeouts, out.failures) == (1, 0)
    # the replacement worker scores the next call normally
    again = hang_stack.score([sample(GOOD, i=i) for i in range(5)])
    assert again.components["idx"] == [0.0, 1.0, 2.0, 3.0, 4.0] and again.timeouts == 0


def test_worker_timer_and_crash():
    with RewardStack({}, custom={"sleepy": custom("sleep_in_python"), "die": custom("die")},
                     timeout_s=1.0, num_workers=1) as stack:
        out = stack.score([sample(GOOD, i=0), sample("sleep", i=1), sample("die", i=2), sample(GOOD, i=3)])
    assert out.components["sleepy"] == [0.0, 0.0, 0.0, 3.0]
    assert out.components["die"] == [0.0, 1.0, 0.0, 3.0]
    assert (out.timeouts, out.failures) == (1, 1)


def test_many_short_samples_and_hostile_inputs():
    """Hostile answers score 0 whether sympy finishes them or the timer stops it; the honest ones in
    the same batch score 1. (benchmarks/rewards times both batches.)"""
    stack = RewardStack({"accuracy": 1.0, "format": 0.1, "language": 0.1}, timeout_s=2.0, num_workers=2)
    try:
        samples = [sample(f" <think> {i} + 1 </think> <answer> {i + 1} </answer>", answer=str(i + 1))
                   for i in range(512)]
        out = stack.score(samples)
        assert out.total == pytest.approx([1.2] * 512) and out.timeouts == 0

        hostile = ["\\frac{" * 500, "{" * 2000 + "}" * 2000, "x^" * 300 + "2", "\\sqrt{" * 200]
        batch = [sample(f"<think>t</think><answer>{h}</answer>", data_source="math") for h in hostile]
        batch.append(sample(GOOD, data_source="math"))
        batch.append(sample("<think>" + "y" * 1_000_000 + "</think><answer>4</answer>", data_source="math"))
        out = stack.score(batch)
        assert out.components["accuracy"] == [0.0] * 4 + [1.0, 1.0]
        assert out.components["format"] == [1.0] * 6
    finally:
        stack.close()
        stack.close()  # idempotent
    with pytest.raises(RuntimeError, match="close"):
        stack.score([sample()])


def test_workers_that_die_while_starting_are_replaced(tmp_path):
    """A killed worker's replacement that fails to start is replaced too (the pool never shrinks, so
    nothing is scored in the trainer's process); too many failures in a row stop the run, saying why."""
    counter = tmp_path / "starts"
    flaky = {"flaky": custom("FlakyStart", counter=str(counter), failing=[2, 3])}
    with RewardStack({}, custom=flaky, timeout_s=1.0, num_workers=1) as stack:
        out = stack.score([sample(GOOD, i=0), sample("die", i=1), sample(GOOD, i=2)])
    assert out.components["flaky"] == [0.0, 0.0, 2.0] and out.failures == 1
    assert counter.read_text() == "xxxx"  # the first worker, two replacements that failed, a good one
    broken = {"flaky": custom("FlakyStart", counter=str(tmp_path / "again"), failing=[2, 3, 4, 5])}
    with RewardStack({}, custom=broken, timeout_s=1.0, num_workers=1) as stack:
        with pytest.raises(RuntimeError, match=r"reward workers keep failing to start \(3 in a row"):
            stack.score([sample("die", i=0), sample(GOOD, i=1)])
        with pytest.raises(RuntimeError, match="pool is closed"):  # not a hang on an empty pool
            stack.score([sample(GOOD, i=0)])


def test_a_sample_that_cannot_be_sent_fails_alone():
    """A sample that does not pickle (a lambda in its metadata) scores 0 as a failure; the rest of its
    chunk is scored by the workers, never in the trainer's process."""
    with RewardStack({}, custom={"idx": custom("index_reward")}, num_workers=1) as stack:
        samples = [sample(GOOD, i=i) for i in range(4)]
        samples[2].metadata["f"] = lambda: 0
        out = stack.score(samples)
        assert stack._scorer is None  # no in-process scorer was ever built
    assert out.components["idx"] == [0.0, 1.0, 0.0, 3.0] and out.failures == 1


def test_in_process_scoring_says_it_is_for_tests(caplog):
    with caplog.at_level(logging.WARNING, logger="r1mega.rewards"):
        RewardStack({"format": 1.0}, num_workers=0)
    assert any("for tests only" in r.getMessage() for r in caplog.records)


def test_streamed_rows_score_as_the_finished_batch(hang_stack):
    """Rows reported as a generator finishes them (any order, in chunks scored while more come) give the
    scores of score() on the whole batch, in row order; a row never reported is named, not scored 0."""
    texts = [GOOD if i % 3 else GOOD + " hang" if i == 6 else "no tags" for i in range(10)]
    whole = hang_stack.score([sample(t, i=i) for i, t in enumerate(texts)])
    stream = hang_stack.streaming(lambda row, ids, reason: sample(texts[row], i=row), chunk=3)
    for row in (4, 0, 9, 6, 1, 2, 8, 3, 7, 5):
        stream.row_done(row, [], "stop")
    assert stream.submitted  # the first chunk went out while rows were still coming
    out = stream.result(10)
    assert (out.total, out.components, out.failures, out.timeouts) == \
        (whole.total, whole.components, whole.failures, whole.timeouts)
    assert out.timeouts == 1  # the hanging row, killed at its deadline, in its place
    partial = hang_stack.streaming(lambda row, ids, reason: sample(GOOD, i=row))
    partial.row_done(0, [], "stop")
    with pytest.raises(RuntimeError, match=r"rows \[1\] were never reported"):
        partial.result(2)


def test_streamed_rows_wait_for_the_workers():
    """A chunk goes out only when the last one is scored: the rows that finish meanwhile go together."""
    from concurrent.futures import Future

    class Stack:
        def __init__(self):
            self.futures = []

        def submit(self, inputs):
            self.futures.append((inputs, Future()))
            return self.futures[-1][1]

    stack = Stack()
    stream = StreamingScore(stack, lambda row, ids, reason: row, chunk=2)
    for row in range(7):
        stream.row_done(row, [], "stop")
    assert [inputs for inputs, _ in stack.futures] == [[0, 1]] and len(stream.pending) == 5
    stack.futures[0][1].set_result([])
    stream.row_done(7, [], "stop")
    assert [inputs for inputs, _ in stack.futures] == [[0, 1], [2, 3, 4, 5, 6, 7]] and not stream.pending
