"""The vendors' own LLM runtimes, run on the files edgelm writes: the bundle is what an app ships.

Phone apps do not embed edgelm; they link ExecuTorch's LLM runner (`LlmModule` on Android,
`TextLLMRunner` in its Python binding), onnxruntime-genai, LiteRT-LM or llama.cpp. Each of
those has its own generation loop, its own tokenizer and its own expectations of the file
(constant methods, a genai_config.json, stop tokens in the metadata). So every decoder
artifact of an export is also run by its format's vendor runtime, unmodified, and its greedy
continuation of the parity prompt is compared with the one edgelm's own session gives on the
same file. The manifest records, per artifact, which runtime was checked, its version and the
result; a runtime that is not installed is recorded as skipped with the reason.

One row per format in `VENDOR_MODULES`; each module defines `VENDOR`, an object with the
`VendorRuntime` shape below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgelm.prefix_cache import common_prefix  # noqa: F401 — re-exported for the vendor checks

# format -> module defining `VENDOR`; imported lazily (each pulls in a native library).
VENDOR_MODULES: dict[str, str] = {
    "executorch": "edgelm.vendors.executorch_runner",
    "gguf": "edgelm.vendors.llamacpp",
    "onnx": "edgelm.vendors.onnxruntime_genai",
    "tflite": "edgelm.vendors.litert_lm",
}
NEW_TOKENS = 64  # the continuation compared, as in the parity report's greedy check


@dataclass
class VendorRun:
    """What a vendor runtime generated from a prompt, greedily."""

    text: str
    tokens: int  # tokens generated (stops at the model's end-of-turn/end-of-text tokens)
    decode_tok_s: float | None  # tokens after the first ÷ the time after the first token
    load_s: float
    ids: list[int] | None = None  # the generated token ids, where the runtime's API gives them
    prompt_ids: list[int] | None = None  # how its own tokenizer encoded the prompt, where it shows that
    ttft_s: float | None = None  # from handing the prompt to the runtime to its first token


@dataclass
class VendorCheck:
    """One vendor runtime's verdict on one artifact (stored in the manifest)."""

    runtime: str  # what an app would call: "executorch TextLLMRunner", "onnxruntime-genai Generator", ...
    package: str
    version: str | None
    result: str  # "passed", "skipped: <why>", "failed: <why>"
    prompt_chars: int = 0
    edgelm_text: str | None = None
    vendor_text: str | None = None
    matching_chars: int | None = None  # identical leading characters of the two continuations
    matching_tokens: int | None = None  # identical leading token ids, where the runtime gives ids
    vendor_decode_tok_s: float | None = None
    vendor_load_s: float | None = None
    files: list[str] = field(default_factory=list)  # sidecar files written for the runtime (bundle-relative)
    tie_breaks: list[int] = field(default_factory=list)  # steps where the vendor took a near-tied token (near_ties)

    @property
    def failed(self) -> bool:
        return self.result.startswith("failed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VendorRuntime(Protocol):
    name: str  # "executorch TextLLMRunner"
    package: str  # the PyPI distribution that ships it
    import_names: tuple[str, ...]  # what must import for it to run (and to write its files)
    text_per_token: bool  # its text is each token decoded alone (ExecuTorch's runner), not the whole sequence

    def prepare(self, artifact: Path, bundle_dir: Path, facts: GenerationFacts) -> list[Path]:
        """Write the files the runtime reads beside the artifact (none for most); return them."""

    def generate(
        self,
        artifact: Path,
        bundle_dir: Path,
        prompt: str,
        facts: GenerationFacts,
        new_tokens: int,
        threads: int | None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> VendorRun:
        """Greedy continuation of `prompt` (text as given: a chat template is the caller's) by the
        runtime's own loop and tokenizer; each piece of text also goes to `on_text`. `ignore_eos`
        (benchmarks: a fixed token count) where the runtime's API allows it."""


@dataclass(frozen=True)
class GenerationFacts:
    """What a vendor runtime needs to know about the model beyond the artifact file."""

    tokenizer_dir: Path  # the bundle's tokenizer folder (tokenizer.json, tokenizer_config.json)
    eos_ids: tuple[int, ...]  # stop tokens
    bos_id: int | None  # added in front of a prompt by the tokenizer, if any
    max_context: int
    vocab_size: int
    chat_template: str | None = None
    pad_id: int | None = None
    shape: dict[str, int] = field(default_factory=dict)  # num_layers, num_heads, num_kv_heads, head_dim, hidden_size


def get_vendor(fmt: str) -> VendorRuntime | None:
    """The vendor runtime checked for `fmt`'s artifacts, or None when the format has none here."""
    module = VENDOR_MODULES.get(fmt)
    return importlib.import_module(module).VENDOR if module else None


def missing(vendor: VendorRuntime) -> str | None:
    """Why `vendor` cannot run here, or None."""
    import importlib.util

    for name in vendor.import_names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{vendor.package} is not installed (no module {name}; pip install 'edgelm[vendors]')"
    return None


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class TokenClock:
    """The text pieces a runtime streams and their arrival times (passed on to `on_text`, for a
    CLI that prints them); the decode rate is tokens after the first ÷ the time since the first
    (the first token's wait is prefill). Made just before the prompt goes in: the wait for the
    first piece is the time to first token."""

    def __init__(self, on_text: Callable[[str], None] | None = None) -> None:
        self.started = time.perf_counter()
        self.stamps: list[float] = []
        self.pieces: list[str] = []
        self.on_text = on_text

    def add(self, piece: str) -> None:
        self.stamps.append(time.perf_counter())
        self.pieces.append(piece)
        if self.on_text:
            self.on_text(piece)

    def run(self, load_s: float, ids: list[int] | None = None, prompt_ids: list[int] | None = None) -> VendorRun:
        return VendorRun(
            text="".join(self.pieces),
            tokens=len(self.pieces),
            decode_tok_s=self.decode_tok_s(),
            load_s=load_s,
            ids=ids,
            prompt_ids=prompt_ids,
            ttft_s=self.stamps[0] - self.started if self.stamps else None,
        )

    def decode_tok_s(self) -> float | None:
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return None
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def tokenizer_facts(tokenizer_dir: Path, extra_eos: Any = None) -> dict[str, Any]:
    """Stop tokens (the tokenizer's EOS and `extra_eos`, e.g. the model config's), the BOS the
    tokenizer puts in front of a text, the pad token and the chat template."""
    from edgelm.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    eos = set(tokenizer.eos_token_ids)
    eos.update(extra_eos if isinstance(extra_eos, (list, tuple)) else [extra_eos] if extra_eos is not None else [])
    with_specials, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    bos = with_specials[0] if with_specials[1:] == plain and len(with_specials) == len(plain) + 1 else None
    return {
        "tokenizer_dir": tokenizer_dir,
        "eos_ids": tuple(sorted(int(i) for i in eos)),
        "bos_id": bos,
        "chat_template": tokenizer.chat_template,
        "pad_id": tokenizer.pad_token_id,
    }


def bundle_facts(bundle_dir: Path, entry: Any) -> GenerationFacts:
    """The facts of an exported bundle's artifact, read from the bundle (no model config needed):
    what running a vendor runtime on it later (`edgelm run --runtime vendor`) needs."""
    signature = entry.signature or {}
    return GenerationFacts(
        **tokenizer_facts(bundle_dir / "tokenizer"),
        max_context=int(signature.get("max_context", 2048)),
        vocab_size=int(signature.get("vocab_size", 0)),
    )


def generation_facts(tokenizer_dir: Path, config: Any) -> GenerationFacts:
    """The facts of a model being exported that vendor runtimes read from their own metadata."""
    from edgelm.graph import decoder_signature

    signature = decoder_signature(config)
    shape = {
        "num_layers": signature.num_layers,
        "num_heads": int(config.num_attention_heads),
        "num_kv_heads": signature.num_kv_heads,
        "head_dim": signature.head_dim,
        "hidden_size": int(config.hidden_size),
    }
    return GenerationFacts(
        **tokenizer_facts(tokenizer_dir, getattr(config, "eos_token_id", None)),
        max_context=signature.max_context,
        vocab_size=signature.vocab_size,
        shape=shape,
    )


def vendor_for(bundle_dir: Path, entry: Any) -> tuple[VendorRuntime, GenerationFacts]:
    """The vendor runtime that runs a bundle's artifact, with the facts it needs; UnsupportedError
    for a format without one here or one that is not installed."""
    from edgelm.errors import UnsupportedError
    from edgelm.isolation import ISOLATED_RUNTIMES, probe

    vendor = get_vendor(entry.format)
    if vendor is None:
        known = ", ".join(VENDOR_MODULES)
        raise UnsupportedError(
            f"{entry.name}: edgelm has no vendor LLM runtime for {entry.format} files (it has for: "
            f"{known}); use --runtime edgelm"
        )
    reason = missing(vendor)
    if reason:
        raise UnsupportedError(f"{entry.name}: {reason}")
    if entry.runtime in ISOLATED_RUNTIMES:  # the vendor's loop runs in this process: its native code must not end it
        probe(entry.runtime, bundle_dir / entry.path)
    return vendor, bundle_facts(bundle_dir, entry)
