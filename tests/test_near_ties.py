"""A vendor runtime that leaves edgelm's greedy path only where two tokens are near-tied passes;
one that leaves it anywhere else fails (edgelm.vendors.near_ties)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from edgelm.vendors import VendorCheck, VendorRun
from edgelm.vendors.check import _verdict
from edgelm.vendors.near_ties import TIE_MARGIN, follow_near_ties, greedy_path

VOCAB = 6
STOP = 5


class ScriptedSession:
    """Next-token logits from the last token: token t prefers t+1; after token 1, tokens 2 and
    3 are near-tied (2 ahead by a tenth of the margin); token 5 is the stop token."""

    def __init__(self) -> None:
        self.last = None

    def _logits(self, token: int) -> np.ndarray:
        logits = np.zeros(VOCAB, dtype=np.float32)
        if token == 1:
            logits[2], logits[3] = 5.0, 5.0 - TIE_MARGIN / 10
        else:
            logits[(token + 1) % VOCAB] = 5.0
        return logits

    def reset(self) -> None:
        self.last = None

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.last = int(ids[-1])
        return np.stack([self._logits(int(t)) for t in ids])

    def decode(self, token: int) -> np.ndarray:
        self.last = token
        return self._logits(token)


def _path(forced=()):
    return greedy_path(ScriptedSession(), [0], 6, {STOP}, list(forced))


def _diverges_from(theirs):
    def diverges(ids):
        return None if ids == theirs else next((k for k, (a, b) in enumerate(zip(ids, theirs)) if a != b), len(ids))

    return diverges


def test_greedy_path_records_the_near_tied_alternatives_and_stops_at_the_stop_token():
    path = _path()
    assert path.ids == [1, 2, 3, 4, 5]  # 0 → 1 → 2 (tie with 3) → 3 → 4 → stop
    assert path.ties[1] == [3] and all(not ties for i, ties in enumerate(path.ties) if i != 1)


def test_a_departure_at_a_near_tie_is_followed_down_the_other_branch():
    vendor = [1, 3, 4, 5]  # took 3 at the tie, then greedy again
    matched = follow_near_ties(_path(), _diverges_from(vendor), _path)
    assert matched is not None and matched.ids == vendor and matched.tie_breaks == [1]


def test_a_departure_anywhere_else_is_not_explained():
    assert follow_near_ties(_path(), _diverges_from([1, 2, 4, 5]), _path) is None  # 2 → 4 is not a tie
    assert follow_near_ties(_path(), _diverges_from([1, 3, 1, 5]), _path) is None  # the tie, then 3 → 1 (not 4)


def _verdict_on(run: VendorRun, text_per_token: bool) -> tuple[str, VendorCheck]:
    vendor = SimpleNamespace(name="fake runtime", text_per_token=text_per_token)
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join("abcdef"[t] for t in ids))
    check = VendorCheck(runtime=vendor.name, package="fake", version="1", result="")
    result = _verdict(vendor, tokenizer, check, run, [0], _path(), _path, {STOP})
    return result, check


def test_the_verdict_follows_a_near_tie_in_ids_and_in_text_and_records_where():
    for run in (VendorRun("", 3, None, 0.0, ids=[1, 3, 4]), VendorRun("bde", 3, None, 0.0)):
        result, check = _verdict_on(run, text_per_token=run.ids is None)
        assert result == "passed" and check.tie_breaks == [1]
    result, check = _verdict_on(VendorRun("bcdd", 4, None, 0.0), text_per_token=False)
    assert result == "failed: fake runtime's greedy text differs from edgelm's after 3 of 4 characters"
    assert check.tie_breaks == []
    result, _ = _verdict_on(VendorRun("bcdea", 5, None, 0.0), text_per_token=False)  # went on past the stop
    assert result.startswith("failed") and "after 4 of 4 characters" in result
