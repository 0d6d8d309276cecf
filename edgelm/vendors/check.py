"""Run one artifact in its vendor runtime and compare the text with edgelm's own session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from edgelm.vendors.near_ties import GreedyPath, follow_near_ties, greedy_path


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
    open_session: Callable[[], Any],
    tokenizer: Any,
    facts: GenerationFacts,
    prompt: str,
    threads: int | None = None,
    write_files: bool = True,
) -> VendorCheck | None:
    """The vendor runtime's verdict on `artifact`, or None when `fmt` has no vendor LLM runtime.

    `open_session()` opens edgelm's own session on the artifact; it is closed before the vendor
    runtime loads the file, so the two never hold the weights at once (at 1B that is the
    difference between fitting in memory or not), and opened again only where the vendor's text
    leaves edgelm's at a near tie. `write_files=False` checks a finished bundle as it is (its
    sidecar files are in its manifest: writing them again would change what the manifest's
    digests describe)."""
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
    prompt_ids = tokenizer.encode(prompt)
    session = open_session()
    try:
        path = greedy_path(session, prompt_ids, NEW_TOKENS, facts.eos_ids)
    finally:
        session.close()
    ids = _without_stop(path.ids, facts.eos_ids)
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
    with _Reopened(open_session) as again:
        redecode = lambda forced: greedy_path(again.session(), prompt_ids, NEW_TOKENS, facts.eos_ids, forced)  # noqa: E731
        check.result = _verdict(vendor, tokenizer, check, run, prompt_ids, path, redecode, facts.eos_ids)
    return check


class _Reopened:
    """edgelm's session opened again on first use (only a near tie needs it), closed on exit."""

    def __init__(self, open_session: Callable[[], Any]) -> None:
        self._open, self._session = open_session, None

    def session(self) -> Any:
        if self._session is None:
            self._session = self._open()
        return self._session

    def __enter__(self) -> _Reopened:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._session is not None:
            self._session.close()


def _without_stop(ids: list[int], stop_ids: Any) -> list[int]:
    """The tokens a runtime's loop shows: up to the first stop token, which it does not."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def edgelm_text_as_shown_by(vendor: Any, tokenizer: Any, ids: list[int]) -> str:
    """edgelm's ids as text the way `vendor` shows text: ExecuTorch's runner decodes token by token
    and drops a piece that is not valid UTF-8 on its own (a character split across two byte
    tokens never appears) and shows special tokens' text; the others decode the whole sequence."""
    if vendor.text_per_token:
        return "".join(tokenizer.decode([token], skip_special_tokens=False) for token in ids)
    return tokenizer.decode(ids)


def _verdict(
    vendor: Any,
    tokenizer: Any,
    check: VendorCheck,
    run: Any,
    prompt_ids: list[int],
    path: GreedyPath,
    redecode: Any,
    stop_ids: Any,
) -> str:
    """Token ids where the runtime gives them (its text of bytes that are not valid UTF-8 is its
    own business), the text otherwise; a departure at a near tie is followed (near_ties)."""
    if run.prompt_ids is not None and list(run.prompt_ids) != list(prompt_ids):
        first = common_prefix(run.prompt_ids, prompt_ids)
        return (
            f"failed: {vendor.name}'s tokenizer encodes the prompt differently ({len(run.prompt_ids)} tokens against "
            f"edgelm's {len(prompt_ids)}, first difference at token {first})"
        )
    ids = _without_stop(path.ids, stop_ids)
    if run.ids is not None:
        theirs_ids = list(run.ids)

        def diverges(candidate: list[int]) -> int | None:
            shown_ids = _without_stop(candidate, stop_ids)
            return None if shown_ids == theirs_ids else common_prefix(shown_ids, theirs_ids)

        check.matching_tokens = common_prefix(theirs_ids, ids)
        what = f"greedy tokens differ from edgelm's after {check.matching_tokens} of {len(ids)}"
    else:
        theirs = shown(run.text)

        def render(candidate: list[int]) -> str:
            return shown(edgelm_text_as_shown_by(vendor, tokenizer, candidate))

        def diverges(candidate: list[int]) -> int | None:
            shown_ids = _without_stop(candidate, stop_ids)
            if render(shown_ids) == theirs:
                return None
            leaves = (k for k in range(len(shown_ids)) if not theirs.startswith(render(shown_ids[: k + 1])))
            return next(leaves, len(shown_ids))

        ours = render(ids)
        check.matching_chars = common_prefix(theirs, ours)
        what = f"greedy text differs from edgelm's after {check.matching_chars} of {len(ours)} characters"
    matched = follow_near_ties(path, diverges, redecode)
    if matched is None:
        return f"failed: {vendor.name}'s {what}"
    check.tie_breaks = matched.tie_breaks
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

    def run(self, fmt: str, artifact: Path, bundle_dir: Path, open_session: Callable[[], Any]) -> VendorCheck | None:
        return check_artifact(
            fmt, artifact, bundle_dir, open_session, self.tokenizer, self.facts, self.prompt, self.threads
        )
