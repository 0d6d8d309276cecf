"""The export's step table (edgelm.steps) and the reference memo (edgelm.memo_session)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from edgelm.memo_session import MemoizedSession
from edgelm.parity import ParitySettings, measure_parity
from edgelm.session import Capabilities
from edgelm.steps import StepClock, reset_peak_rss


class CountingSession:
    """A deterministic fake decoder: logits depend on the whole history since reset."""

    def __init__(self, vocab: int = 9000) -> None:
        self.capabilities = Capabilities(max_context=4096)
        self.vocab, self.history, self.calls = vocab, [], 0

    def _logits(self, ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        rows = []
        for token in ids:
            self.history.append(int(token))
            rng = np.random.default_rng(hash(tuple(self.history)) % (1 << 32))
            rows.append(rng.standard_normal(self.vocab).astype(np.float32))
        return np.stack(rows)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._logits(np.asarray(ids))

    def decode(self, token_id: int) -> np.ndarray:
        return self._logits(np.asarray([token_id]))[-1]

    def reset(self) -> None:
        self.history = []


def test_memo_returns_the_same_answers_and_computes_each_once(tmp_path):
    inner, plain = CountingSession(), CountingSession()
    memo = MemoizedSession(inner, tmp_path)
    ids = list(range(1, 300))
    artifact = CountingSession()
    settings = ParitySettings(max_tokens=256, window=64, stride=64)
    first = measure_parity(artifact, memo, ids, 1.1, settings)
    calls = inner.calls
    second = measure_parity(CountingSession(), memo, ids, 1.1, settings)
    assert inner.calls == calls  # the second artifact is scored without running the reference again
    assert memo.reused > 0
    unmemoized = measure_parity(CountingSession(), plain, ids, 1.1, settings)
    assert first.to_dict() == second.to_dict() == unmemoized.to_dict()
    assert any(tmp_path.iterdir())  # a window's logits (64 × 9000 floats) went to disk
    memo.close()
    assert not any(tmp_path.iterdir())


def test_memo_brings_the_wrapped_cache_to_the_asked_history(tmp_path):
    inner, plain = CountingSession(), CountingSession()
    memo = MemoizedSession(inner, tmp_path)
    memo.prefill(np.array([5, 6, 7]))
    memo.reset()
    memo.prefill(np.array([1, 2]))
    memo.reset()
    memo.prefill(np.array([5, 6, 7]))  # remembered: the wrapped session now holds [1, 2]
    got = memo.decode(8)  # not remembered: computed after replaying [5, 6, 7]
    plain.prefill(np.array([5, 6, 7]))
    np.testing.assert_array_equal(got, plain.decode(8))
    memo.close()


def test_step_clock_times_nested_steps_and_forwards_notes():
    seen, notes = [], []

    @contextmanager
    def hook(name):
        seen.append(name)
        yield

    hook.note = notes.append
    clock = StepClock(hook)
    with clock("outer"), clock("inner"):
        clock.note("1/2")
    with pytest.raises(ValueError), clock("failing"):
        raise ValueError
    assert seen == ["outer", "inner", "failing"] and notes == ["1/2"]
    assert [(t.step, t.depth) for t in clock.times] == [("inner", 1), ("outer", 0), ("failing", 0)]
    assert all(t.seconds >= 0 for t in clock.times)
    assert not hasattr(StepClock(), "note")  # no hook, no live detail


@pytest.mark.skipif(not reset_peak_rss(), reason="this kernel offers no reset of the peak RSS (Linux clear_refs)")
def test_each_step_records_its_own_peak_memory():
    clock = StepClock()
    with clock("outer"):
        big = np.ones(300 << 17)  # 300 MB touched
        del big
        with clock("inner (small)"):
            small = np.ones(1 << 17)
            del small
    with clock("after (small)"):
        pass
    peaks = {t.step: t.peak_rss_mb for t in clock.times}
    # the outer step keeps the peak it reached before its inner step reset the high-water mark
    assert peaks["outer"] >= peaks["inner (small)"] + 250
    assert peaks["after (small)"] < peaks["outer"] - 250
    assert clock.peak_rss_mb() == peaks["outer"]
    clock.record_background("worker", 10.0, 12345.0)
    assert clock.peak_rss_mb() == 12345.0


def test_a_large_model_gets_the_presets_smaller_plan_and_the_report_says_what_was_left_out():
    from edgelm.export import ExportOptions, plan_artifacts
    from edgelm.targets import LARGE_MODEL_PARAMETERS

    small, skipped_small = plan_artifacts(ExportOptions(target="android"), parameters=494_000_000)
    large, skipped_large = plan_artifacts(ExportOptions(target="android"), parameters=LARGE_MODEL_PARAMETERS)
    assert ("gguf", "int8") in small and ("onnx", "int8") in small and not skipped_small
    assert set(small) - set(large) == {("gguf", "int8"), ("onnx", "int8")}
    assert {("gguf", "int4"), ("executorch", "int4"), ("tflite", "int8"), ("onnx", "int4")} <= set(large)
    assert set(skipped_large) == {"gguf-int8", "onnx-int8"}
    assert all("--quant int8" in why for why in skipped_large.values())
    # asked for explicitly, a large model gets exactly what was asked
    asked, skipped = plan_artifacts(
        ExportOptions(target="android", quants=("int8",), formats=("onnx",)), parameters=1_240_000_000
    )
    assert asked == [("safetensors", "fp32"), ("onnx", "int8")] and not skipped
    desktop, skipped = plan_artifacts(ExportOptions(target="linux-x86_64"), parameters=1_240_000_000)
    assert ("onnx", "fp32") not in desktop and ("onnx", "int8") in desktop and "onnx-fp32" in skipped
