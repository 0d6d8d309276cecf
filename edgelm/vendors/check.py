"""Run one artifact in its vendor runtime and compare the text with edgelm's own session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.parity import greedy_continuation
from edgelm.vendors import (
    NEW_TOKENS,
    VENDOR_MODULES,
    GenerationFacts,
    VendorCheck,
    common_prefix,
    get_vendor,
    missing,
    package_version,
)


def edgelm_continuation(session: Any, tokenizer: Any, prompt: str, facts: GenerationFacts,
                        new_tokens: int = NEW_TOKENS) -> str:
    """edgelm's greedy continuation of `prompt` on an open session, cut where a runtime's loop
    stops (the first stop token), decoded as an app would show it."""
    ids = greedy_continuation(session, tokenizer.encode(prompt), new_tokens)
    stop = next((i for i, token in enumerate(ids) if token in facts.eos_ids), len(ids))
    return tokenizer.decode(ids[:stop])


def one_line(message: str, limit: int = 400) -> str:
    """A native runtime's message on one line; a long one keeps its start and its end, where
    C++ runtimes put the actual reason ("... Missing Input: past_value_0")."""
    message = " ".join(message.split())
    return message if len(message) <= limit else f"{message[:limit // 3]} … {message[-(limit * 2 // 3):]}"


def shown(text: str) -> str:
    """The text without U+FFFD: runtimes differ only in how they show bytes that are not valid
    UTF-8 on their own (edgelm's decoder prints U+FFFD, llama.cpp drops them), not in tokens."""
    return text.replace("\ufffd", "")


def check_artifact(fmt: str, artifact: Path, bundle_dir: Path, session: Any, tokenizer: Any,
                   facts: GenerationFacts, prompt: str, threads: int | None = None) -> VendorCheck | None:
    """The vendor runtime's verdict on `artifact`, or None when `fmt` has no vendor LLM runtime."""
    vendor = get_vendor(fmt)
    if vendor is None:
        return None
    check = VendorCheck(runtime=vendor.name, package=vendor.package, version=package_version(vendor.package),
                        result="passed", prompt_chars=len(prompt))
    reason = missing(vendor)
    if reason:
        check.result = f"skipped: {reason}"
        return check
    check.edgelm_text = edgelm_continuation(session, tokenizer, prompt, facts)
    try:
        check.files = [p.relative_to(bundle_dir).as_posix() for p in vendor.prepare(artifact, bundle_dir, facts)]
        run = vendor.generate(artifact, bundle_dir, prompt, facts, NEW_TOKENS, threads)
    except (TypeError, AttributeError, NameError):
        raise  # a bug in edgelm's adapter, not the runtime's verdict on the file
    except Exception as err:  # noqa: BLE001 — the runtime's own refusal, of any type, is the finding
        check.result = f"failed: {vendor.name} refused the file ({type(err).__name__}: {one_line(str(err))})"
        return check
    check.vendor_text, check.vendor_decode_tok_s, check.vendor_load_s = run.text, run.decode_tok_s, run.load_s
    ours, theirs = shown(check.edgelm_text), shown(run.text)
    check.matching_chars = common_prefix(theirs, ours)
    if theirs != ours:
        check.result = (f"failed: {vendor.name}'s greedy text differs from edgelm's after {check.matching_chars} of "
                        f"{len(ours)} characters")
    return check


class VendorChecks:
    """The vendor-runtime check of every decoder artifact of one export: one prompt (the parity
    prompt as text, as an app would pass it) and one set of model facts for all of them."""

    def __init__(self, tokenizer: Any, facts: GenerationFacts, prompt: str, threads: int | None = None) -> None:
        self.tokenizer, self.facts, self.prompt, self.threads = tokenizer, facts, prompt, threads

    @staticmethod
    def covers(fmt: str) -> bool:
        """Whether `fmt` has a vendor LLM runtime edgelm checks."""
        return fmt in VENDOR_MODULES

    def run(self, fmt: str, artifact: Path, bundle_dir: Path, session: Any) -> VendorCheck | None:
        return check_artifact(fmt, artifact, bundle_dir, session, self.tokenizer, self.facts, self.prompt,
                              self.threads)
