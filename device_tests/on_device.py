"""Runs ON the device (a runtime-only edgelm, no torch): load one artifact of a pushed bundle,
measure perplexity on the parity text, keep the first window's logits, generate greedily.

    python3 on_device.py BUNDLE ARTIFACT OUT_PREFIX [TOKENS] [WINDOW]

Writes OUT_PREFIX.json (perplexity, greedy text, device record) and OUT_PREFIX.npy (logits
of the first window). device_tests/ runs the same script locally and compares.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import edgelm
from edgelm.parity import parity_text
from edgelm.profile import device_record


def main(bundle: str, artifact: str, out: str, tokens: int = 512, window: int = 128) -> None:
    model = edgelm.load(bundle, format=artifact)
    ids = model.tokenizer.encode(parity_text())[:tokens]
    session = model.session()
    nll, count, first = 0.0, 0, None
    for start in range(0, len(ids) - 1, window):
        chunk = np.asarray(ids[start : start + window + 1], dtype=np.int64)
        if len(chunk) < 2:
            break
        session.reset()
        logits = session.prefill(chunk[:-1]).astype(np.float64)
        if first is None:
            first = logits.astype(np.float32)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    session.reset()
    text = model.generate("The parity", max_new_tokens=16)
    np.save(out + ".npy", first)
    with open(out + ".json", "w") as fh:
        json.dump(
            {"perplexity": float(np.exp(nll / count)), "tokens": count, "greedy": text, "device": device_record()}, fh
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
