"""What a compression run does, as data: saved into the output folder and the bundle manifest."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgelm.compress.distill import DistillSettings
from edgelm.compress.layers import IMPORTANCE_METHODS
from edgelm.compress.prune import PRUNE_METHODS
from edgelm.errors import EdgeLMError, UnsupportedError

RECORD_FILE = "compression.json"


@dataclass
class LayerDrop:
    count: int
    importance: str = "loss"  # loss | cosine | last (see edgelm.compress.layers)


@dataclass
class Prune:
    method: str  # l1 | l1-layer | 2:4 | heads | channels
    sparsity: float = 0.5  # weights (l1), or heads / channels (structured) removed; 2:4 is always 0.5


@dataclass
class CompressRecipe:
    drop_layers: LayerDrop | None = None
    prune: Prune | None = None
    distill: DistillSettings | None = None
    calibration_tokens: int = 1024  # scores layers, heads and channels (train split)
    calibration_window: int = 256
    eval_tokens: int | None = None  # held-out tokens for the before/after perplexity (None: all)
    eval_window: int = 512
    teacher_continuations: int = 0  # sequence-level distillation: teacher-written training text (with distill)

    def __post_init__(self) -> None:
        if self.drop_layers and self.drop_layers.importance not in IMPORTANCE_METHODS:
            raise UnsupportedError(
                f"unknown layer importance {self.drop_layers.importance!r}; "
                f"choose one of {', '.join(IMPORTANCE_METHODS)}"
            )
        if self.prune and self.prune.method not in PRUNE_METHODS:
            raise UnsupportedError(
                f"unknown pruning method {self.prune.method!r}; choose one of {', '.join(PRUNE_METHODS)}"
            )
        if not (self.drop_layers or self.prune or self.distill):
            raise UnsupportedError("the recipe does nothing: give drop_layers, prune and/or distill")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressRecipe:
        parts = {"drop_layers": LayerDrop, "prune": Prune, "distill": DistillSettings}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UnsupportedError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts and value is not None:
                if not isinstance(value, dict):
                    raise UnsupportedError(f"recipe key {key!r} must be an object")
                try:
                    kwargs[key] = parts[key](**value)
                except TypeError as err:
                    raise UnsupportedError(f"recipe key {key!r}: {err}") from err
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> CompressRecipe:
        from edgelm.model import read_json_object

        path = Path(path)
        if not path.exists():
            raise EdgeLMError(f"{path}: no such recipe file")
        data = read_json_object(path, EdgeLMError, "not a JSON recipe (see `edgelm compress --help`)")
        recipe = data.get("recipe", data)
        if not isinstance(recipe, dict):
            raise EdgeLMError(f"{path}: its recipe must be a JSON object")
        return cls.from_dict(recipe)  # a compression.json works as a recipe too


@dataclass
class CompressionRecord:
    """compression.json: how a model folder came from its base model, with measured figures."""

    base_model: str
    base_model_sha256: str
    recipe: dict[str, Any]
    corpus: dict[str, Any]
    perplexity: dict[str, float]  # held-out perplexity: base, after each step
    parameters: dict[str, int]  # before / after
    steps: list[dict[str, Any]] = field(default_factory=list)  # what each step did, in order
    base_model_relation: str = "finetune"  # Hugging Face's closest term for changed weights
    kept_layers: list[int] | None = None  # teacher layer index of each student layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: Path) -> None:
        (folder / RECORD_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> CompressionRecord | None:
        from edgelm.model import read_json_object

        path = folder / RECORD_FILE
        if not path.is_file():
            return None
        data = read_json_object(path, EdgeLMError, "fix or remove it")
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})
