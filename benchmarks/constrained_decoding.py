"""The constrained-decoding libraries edgelm could use, measured on the same schema, vocabulary
and tokens: llguidance, xgrammar and outlines-core.

    python benchmarks/constrained_decoding.py --tokenizer /tmp/serve-bundle/tokenizer --vocab 49152 \
        --out benchmarks/results/constrained_decoding.json

Per library: the time to compile a JSON schema against the vocabulary, and per token (median
over the tokens of a document that follows the schema, 5 passes) the time to compute the mask
of allowed tokens, apply it to a float32 logits row and accept the token — what the generation
loop pays on every step. The vocabulary is the bundle's byte-level BPE tokenizer.json, given to
each library as raw token bytes (xgrammar, outlines-core) or as the file itself (llguidance).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_and_save

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "member"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace of the analytical engine", "age": 36, "tags": ["red", "blue"], "member": True}
PASSES = 5


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (tokenizer.json stores tokens in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def raw_vocabulary(tokenizer_json: Path, size: int) -> tuple[list[bytes], set[int]]:
    """Each id's bytes ("" for ids past the tokenizer's), and the special tokens' ids."""
    data = json.loads(tokenizer_json.read_text())
    decoder = _byte_decoder()
    raw = [b""] * size
    for token, index in data["model"]["vocab"].items():
        if index < size:
            raw[index] = bytes(decoder[c] for c in token)
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    for t in data.get("added_tokens", []):
        if t["id"] < size:
            raw[t["id"]] = t["content"].encode()
    return raw, special


def _timed_steps(step: Any, tokens: list[int], reset: Any) -> list[float]:
    times = []
    for _ in range(PASSES):
        reset()
        for token in tokens:
            started = time.perf_counter()
            step(token)
            times.append(time.perf_counter() - started)
    return times


def llguidance_run(tokenizer_json: Path, size: int, eos: int, tokens: list[int], logits: np.ndarray) -> dict[str, Any]:
    import llguidance

    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    started = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tokenizer_json.read_text(), n_vocab=size, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=options)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    compile_s = time.perf_counter() - started
    assert not matcher.is_error(), matcher.get_error()

    def step(token: int) -> None:
        allowed = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")[:size]
        masked = np.where(allowed.astype(bool), logits, -np.inf)
        assert masked[token] > -np.inf
        assert matcher.consume_token(token)

    return {"compile_s": compile_s, "times": _timed_steps(step, tokens, matcher.reset)}


def xgrammar_run(raw: list[bytes], eos: int, tokens: list[int], logits: np.ndarray) -> dict[str, Any]:
    import torch
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=len(raw), stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - started
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    row = torch.from_numpy(logits.copy())

    def step(token: int) -> None:
        matcher.fill_next_token_bitmask(bitmask)
        masked = row.clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask)
        assert masked[token] > -float("inf")
        assert matcher.accept_token(token)

    return {"compile_s": compile_s, "times": _timed_steps(step, tokens, matcher.reset)}


def outlines_core_run(
    raw: list[bytes], special: set[int], eos: int, tokens: list[int], logits: np.ndarray
) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    mapping: dict[bytes, list[int]] = {}
    for index, token in enumerate(raw):
        if token and index not in special and index != eos:
            mapping.setdefault(token, []).append(index)
    vocabulary = Vocabulary(eos, mapping)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    index = Index(regex, vocabulary)
    guide = Guide(index)
    compile_s = time.perf_counter() - started
    size = len(raw)
    mask = np.zeros((size + 31) // 32, dtype=np.int32)

    def step(token: int) -> None:
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:size]
        masked = np.where(allowed.astype(bool), logits, -np.inf)
        assert masked[token] > -np.inf
        guide.advance(token)

    return {"compile_s": compile_s, "times": _timed_steps(step, tokens, guide.reset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a bundle's tokenizer folder")
    parser.add_argument("--vocab", type=int, required=True, help="the model's logits width")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer_json = args.tokenizer / "tokenizer.json"
    config = json.loads((args.tokenizer / "tokenizer_config.json").read_text())
    eos_text = config["eos_token"] if isinstance(config["eos_token"], str) else config["eos_token"]["content"]
    hf = Tokenizer.from_file(str(tokenizer_json))
    eos = hf.token_to_id(eos_text)
    tokens = hf.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).ids
    raw, special = raw_vocabulary(tokenizer_json, args.vocab)
    logits = np.random.default_rng(0).standard_normal(args.vocab).astype(np.float32)
    runs = {
        "llguidance": llguidance_run(tokenizer_json, args.vocab, eos, tokens, logits),
        "xgrammar": xgrammar_run(raw, eos, tokens, logits),
        "outlines-core": outlines_core_run(raw, special, eos, tokens, logits),
    }
    from importlib.metadata import version

    report = {
        "vocab_size": args.vocab,
        "document_tokens": len(tokens),
        "passes": PASSES,
        "libraries": {
            name: {
                "version": version(name),
                "compile_s": run["compile_s"],
                "per_token_us_median": 1e6 * statistics.median(run["times"]),
                "per_token_us_p90": 1e6 * sorted(run["times"])[int(0.9 * len(run["times"]))],
            }
            for name, run in runs.items()
        },
    }
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
