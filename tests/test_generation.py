"""The shared generation loop and every sampling option, on a scripted fake session."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import UnsupportedError
from edgelm.generate import stream_tokens
from edgelm.sampling import SamplingConfig, apply_repetition_penalty, sample_next
from edgelm.session import Capabilities
from edgelm.tokenizer import Tokenizer


class ScriptedSession:
    """Emits logits that favour a scripted sequence of token ids, one per step."""

    def __init__(self, script: list[int], vocab: int, max_context: int = 512):
        self.script, self.vocab, self.step = script, vocab, 0
        self.capabilities = Capabilities(max_context=max_context)
        self.decoded: list[int] = []

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits

    def prefill(self, ids):
        out = np.zeros((len(ids), self.vocab), dtype=np.float32)
        out[-1] = self._logits()
        return out

    def decode(self, token_id):
        self.decoded.append(token_id)
        return self._logits()

    def reset(self):
        self.step = 0

    def close(self):
        pass


@pytest.fixture
def tok(tiny_llama):
    return Tokenizer(tiny_llama)


def _text(tok, session, **config):
    return "".join(t.text for t in stream_tokens(session, tok, tok.encode("The"), SamplingConfig(**config)))


def test_greedy_follows_argmax_and_stops_at_max_tokens(tok):
    script = tok.encode(" the object is returned")
    session = ScriptedSession(script, tok.vocab_size)
    assert _text(tok, session, max_new_tokens=len(script)) == " the object is returned"
    assert _text(tok, ScriptedSession(script, tok.vocab_size), max_new_tokens=2) == tok.decode(script[:2])


def test_eos_stops_generation_unless_ignored(tok):
    eos = tok.token_to_id("<|im_end|>")
    script = tok.encode(" yes") + [eos] + tok.encode(" more")
    assert _text(tok, ScriptedSession(script, tok.vocab_size), max_new_tokens=10) == " yes"
    assert " more" in _text(tok, ScriptedSession(script, tok.vocab_size), max_new_tokens=10, ignore_eos=True)


def test_stop_string_is_cut_and_not_emitted(tok):
    script = tok.encode(" alpha STOP beta")
    out = _text(tok, ScriptedSession(script, tok.vocab_size), max_new_tokens=20, stop=("STOP",))
    assert out == " alpha "


def test_stop_string_prefix_is_held_back_then_released(tok):
    script = tok.encode(" ST ok")
    out = _text(tok, ScriptedSession(script, tok.vocab_size), max_new_tokens=len(script), stop=("STOP",))
    assert out == " ST ok"


def test_generation_stops_at_the_session_max_context(tok):
    prompt = tok.encode("The")
    session = ScriptedSession(tok.encode(" a b c d e f g"), tok.vocab_size, max_context=len(prompt) + 3)
    tokens = list(stream_tokens(session, tok, prompt, SamplingConfig(max_new_tokens=50)))
    assert len([t for t in tokens if t.token_id >= 0]) == 3


def test_seed_makes_sampling_reproducible_and_temperature_spreads_choices():
    rng_logits = np.random.default_rng(0).normal(size=50)
    config = SamplingConfig(temperature=1.0, seed=7)
    draw = lambda: [sample_next(rng_logits, [], config, np.random.default_rng(7)) for _ in range(5)]  # noqa: E731
    assert draw() == draw()
    picks = {sample_next(rng_logits, [], config, np.random.default_rng(s)) for s in range(200)}
    assert len(picks) > 5
    cold = {sample_next(rng_logits, [], SamplingConfig(temperature=0.01), np.random.default_rng(s)) for s in range(50)}
    assert cold == {int(np.argmax(rng_logits))}


def test_top_k_limits_choices_to_k_most_likely():
    logits = np.arange(20, dtype=np.float64)
    picks = {
        sample_next(logits, [], SamplingConfig(temperature=5.0, top_k=3), np.random.default_rng(s)) for s in range(300)
    }
    assert picks == {17, 18, 19}


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {
        sample_next(logits, [], SamplingConfig(temperature=1.0, top_p=0.7), np.random.default_rng(s))
        for s in range(300)
    }
    assert picks == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    penalised = apply_repetition_penalty(logits, [0, 2], 2.0)
    assert penalised.tolist() == [1.0, 1.9, -2.0]
    assert sample_next(logits, [0], SamplingConfig(repetition_penalty=2.0), np.random.default_rng(0)) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_invalid_sampling_settings_are_rejected(bad):
    with pytest.raises(UnsupportedError, match="invalid sampling setting"):
        SamplingConfig(**bad)


def test_sampling_config_round_trips_through_a_dict():
    config = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, stop=("\n\n",), seed=3)
    assert SamplingConfig.from_dict(config.to_dict()) == config
