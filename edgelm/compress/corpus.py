"""Training and calibration text: real English, cleaned, deduplicated, split, offline.

The corpus is CPython's own documentation, which ships with every Python: the pydoc
topics (`pydoc_data.topics`) and the docstrings of a fixed list of standard-library
modules. The parity text (`edgelm.parity.parity_text`, the first 40,000 characters of the
sorted topics) is removed before anything else, so no compressed model is ever trained
or calibrated on the text its artifacts are judged on.

Cleaning, in order: Unicode NFKC normalisation, reStructuredText / HTML markup
stripped, whitespace collapsed, paragraphs outside a length window dropped, exact
duplicates dropped (hash of the normalised text), near duplicates dropped (MinHash LSH
over word 5-gram shingles, Jaccard >= 0.8). The survivors are split into train and
held-out by a hash of each paragraph, so the split does not move when the corpus grows.
"""

from __future__ import annotations

import hashlib
import html
import importlib
import inspect
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm.errors import UnsupportedError
from edgelm.parity import parity_text

# Standard-library modules whose docstrings are long, plain English prose.
DOCSTRING_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "http.server",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "optparse",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)

_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")  # :func:`name <target>` -> name
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")
_TAG = re.compile(r"<[^>\n]{1,80}>")
_DIRECTIVE = re.compile(r"^\s*\.\. [\w:-]+::.*$", re.MULTILINE)
_SPACES = re.compile(r"[ \t]+")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class CorpusSettings:
    min_chars: int = 200  # paragraphs (blocks) shorter than this carry little context
    max_chars: int = 6_000
    near_duplicate_jaccard: float = 0.8
    heldout_fraction: float = 0.1
    seed: str = "edgelm-corpus-v1"  # part of the split hash: change it to draw another split


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    stats: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"source": "pydoc_data.topics (minus the parity text) + stdlib docstrings", **self.stats}


def strip_markup(text: str) -> str:
    """Plain prose from reStructuredText / HTML-ish documentation text."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = _DIRECTIVE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _paragraph_key(paragraph: str) -> str:
    return " ".join(_WORD.findall(paragraph.lower()))


def blocks(text: str, max_chars: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Split a document into blocks of whole paragraphs no longer than `max_chars`.

    Paragraphs whose words match one in `exclude` (the parity text's) are left out: the
    documentation repeats some paragraphs under several topics.
    """
    out, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para or _paragraph_key(para) in exclude:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def _shingles(text: str, n: int = 5) -> set[bytes]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}


def deduplicate(texts: Iterable[str], jaccard: float) -> tuple[list[str], int, int]:
    """Drop exact, then near duplicates (first one kept). Returns (kept, exact_dropped, near_dropped)."""
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError as err:
        raise UnsupportedError(
            "edgelm compress needs datasketch to remove near-duplicate text: pip install 'edgelm[compress]'"
        ) from err

    seen: set[str] = set()
    lsh = MinHashLSH(threshold=jaccard, num_perm=64)
    kept, exact, near = [], 0, 0
    for text in texts:
        key = hashlib.sha256(" ".join(_WORD.findall(text.lower())).encode()).hexdigest()
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        signature = MinHash(num_perm=64, seed=1)
        signature.update_batch(list(_shingles(text)))
        if lsh.query(signature):
            near += 1
            continue
        lsh.insert(str(len(kept)), signature)
        kept.append(text)
    return kept, exact, near


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a Python built without it (sqlite3, ...): one source fewer
        return []
    docs = [inspect.getdoc(module) or ""]
    for _, member in sorted(vars(module).items()):
        if getattr(member, "__module__", None) == module.__name__ and (
            inspect.isclass(member) or inspect.isfunction(member)
        ):
            docs.append(inspect.getdoc(member) or "")
    return [d for d in docs if d]


def raw_documents() -> list[str]:
    """Every source document, parity text removed: topics after the parity slice, then docstrings."""
    from pydoc_data.topics import topics

    held_for_parity = parity_text()
    joined = "\n\n".join(topics[key] for key in sorted(topics))
    if not joined.startswith(held_for_parity):
        raise AssertionError("the parity text is no longer a prefix of the sorted topics")  # parity.py changed
    documents = [joined[len(held_for_parity) :]]
    for name in DOCSTRING_MODULES:
        documents.extend(_docstrings(name))
    return documents


def build_corpus(settings: CorpusSettings | None = None) -> Corpus:
    """The cleaned, deduplicated train / held-out corpus (deterministic for a given Python)."""
    settings = settings or CorpusSettings()
    held_out_for_parity = frozenset(_paragraph_key(p) for p in strip_markup(parity_text()).split("\n\n") if p.strip())
    candidates = [
        b for doc in raw_documents() for b in blocks(strip_markup(doc), settings.max_chars, held_out_for_parity)
    ]
    in_window = [b for b in candidates if len(b) >= settings.min_chars]
    kept, exact, near = deduplicate(in_window, settings.near_duplicate_jaccard)
    train, heldout = [], []
    for text in kept:
        bucket = int(hashlib.sha256(f"{settings.seed}\0{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (heldout if bucket < settings.heldout_fraction else train).append(text)
    stats = {
        "blocks": len(candidates),
        "too_short": len(candidates) - len(in_window),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "train_blocks": len(train),
        "heldout_blocks": len(heldout),
        "train_chars": sum(map(len, train)),
        "heldout_chars": sum(map(len, heldout)),
    }
    return Corpus(train=train, heldout=heldout, stats=stats | {"settings": asdict(settings)})  # type: ignore[dict-item]


def token_stream(texts: list[str], encode: Any, eos_id: int | None) -> list[int]:
    """All texts tokenized and joined, each followed by EOS (when the tokenizer has one)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        if eos_id is not None:
            ids.append(eos_id)
    return ids
