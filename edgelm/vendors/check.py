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


def edgelm_continuation(
    session: Any, tokenizer: Any, prompt: str, facts: GenerationFacts, new_tokens: int = NEW_TOKENS
) -> tuple[list[int], list[int]]:
    """(prompt ids, edgelm's greedy continuation of them on an open session, cut where a
    runtime's loop stops: the first stop token)."""
    prompt_ids = tokenizer.encode(prompt)
    ids = greedy_continuation(session, prompt_ids, new_tokens)
    stop = next((i for i, token in enumerate(ids) if token in facts.eos_ids), len(ids))
    return prompt_ids, ids[:stop]


def one_line(message: str, limit: int = 400) -> str:
    """A native runtime's message on one line; a long one keeps its start and its end, where
    C++ runtimes put the actual reason ("... Missing Input: past_value_0")."""
    message = " ".join(message.split())
    return message if len(message) <= limit else f"{message[: limit // 3]} … {message[-(limit * 2 // 3) :]}"


def shown(text: str) -> str:
    """The text as compared: without U+FFFD and control characters other than tab and newlines.
    Runtimes differ only in how they show bytes that are not valid UTF-8 on their own (edgelm's
    decoder prints U+FFFD, llama.cpp drops them) and whether they print control characters
    (ExecuTorch's tokenizer drops them), not in tokens."""
    return "".join(c for c in text if c != "\ufffd" and (c >= " " or c in "\t\n\r"))


def check_artifact(
    fmt: str,
    artifact: Path,
    bundle_dir: Path,
    session: Any,
    tokenizer: Any,
    facts: GenerationFacts,
    prompt: str,
    threads: int | None = None,
    write_files: bool = True,
) -> VendorCheck | None:
    """The vendor runtime's verdict on `artifact`, or None when `fmt` has no vendor LLM runtime.
    `write_files=False` checks a finished bundle as it is (its sidecar files are in its manifest:
    writing them again would change what the manifest's digests describe)."""
    vendor = get_vendor(fmt)
    if vendor is None:
        return None
    check = VendorCheck(
        runtime=vendor.name,
        package=vendor.package,
        version=package_version(vendor.package),
        result="passed",
        prompt_chars=len(prompt),
    )
    reason = missing(vendor)
    if reason:
        check.result = f"skipped: {reason}"
        return check
    prompt_ids, ids = edgelm_continuation(session, tokenizer, prompt, facts)
    check.edgelm_text = tokenizer.decode(ids)
    try:
        if write_files:
            check.files = [p.relative_to(bundle_dir).as_posix() for p in vendor.prepare(artifact, bundle_dir, facts)]
        run = vendor.generate(artifact, bundle_dir, prompt, facts, NEW_TOKENS, threads)
    except (TypeError, AttributeError, NameError):
        raise  # a bug in edgelm's adapter, not the runtime's verdict on the file
    except Exception as err:  # noqa: BLE001 — the runtime's own refusal, of any type, is the finding
        check.result = f"failed: {vendor.name} refused the file ({type(err).__name__}: {one_line(str(err))})"
        return check
    check.vendor_text, check.vendor_decode_tok_s, check.vendor_load_s = run.text, run.decode_tok_s, run.load_s
    check.result = _verdict(vendor, tokenizer, check, run, prompt_ids, ids)
    return check


def edgelm_text_as_shown_by(vendor: Any, tokenizer: Any, ids: list[int]) -> str:
    """edgelm's ids as text the way `vendor` shows text: ExecuTorch's runner decodes token by token
    and drops a piece that is not valid UTF-8 on its own (a character split across two byte
    tokens never appears) and shows special tokens' text; the others decode the whole sequence."""
    if vendor.text_per_token:
        return "".join(tokenizer.decode([token], skip_special_tokens=False) for token in ids)
    return tokenizer.decode(ids)


def _verdict(vendor: Any, tokenizer: Any, check: VendorCheck, run: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """Token ids where the runtime gives them (its text of bytes that are not valid UTF-8 is its
    own business), the text otherwise."""
    if run.prompt_ids is not None and list(run.prompt_ids) != list(prompt_ids):
        first = common_prefix(run.prompt_ids, prompt_ids)
        return (
            f"failed: {vendor.name}'s tokenizer encodes the prompt differently ({len(run.prompt_ids)} tokens against "
            f"edgelm's {len(prompt_ids)}, first difference at token {first})"
        )
    if run.ids is not None:
        check.matching_tokens = common_prefix(run.ids, ids)
        if list(run.ids) != list(ids):
            return (
                f"failed: {vendor.name}'s greedy tokens differ from edgelm's after {check.matching_tokens} of "
                f"{len(ids)}"
            )
        return "passed"
    ours, theirs = shown(edgelm_text_as_shown_by(vendor, tokenizer, ids)), shown(run.text)
    check.matching_chars = common_prefix(theirs, ours)
    if theirs != ours:
        return (
            f"failed: {vendor.name}'s greedy text differs from edgelm's after {check.matching_chars} of "
            f"{len(ours)} characters"
        )
    return "passed"


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
        return check_artifact(fmt, artifact, bundle_dir, session, self.tokenizer, self.facts, self.prompt, self.threads)
