"""Budget search: try compression recipes × export formats, keep the Pareto set, pick the smallest that fits.

Every candidate is measured, not estimated: each recipe (layers dropped, MLP channels
pruned) is applied and the result exported to the requested formats and quant recipes
through the ordinary export path, so its size is the real file size, its perplexity is
the artifact's own on the parity text (as a ratio to the *uncompressed* fp32 model), and
its decode speed is a real profile. Candidates no other candidate beats on all three of
size, perplexity and speed form the Pareto set; the chosen one is the smallest file that
meets both limits (ties: lower perplexity).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgelm.bundle import check_replaceable, is_compressed_model
from edgelm.compress.distill import DistillSettings
from edgelm.compress.pipeline import compress_model
from edgelm.compress.recipe import CompressRecipe, LayerDrop, Prune
from edgelm.staging import move_into_place, scratch_beside
from edgelm.steps import StepHook

BUDGET_FILE = "budget.json"


@dataclass(frozen=True)
class SearchSpace:
    layers_dropped: tuple[int, ...] = (0, 2, 4, 6)  # the uncompressed model is always measured too
    channel_fractions: tuple[float, ...] = (0.0,)  # structured MLP pruning: the only sparsity that shrinks files
    importance: str = "loss"
    distill_steps: int = 0  # distil each compressed candidate this many steps first

    def grid(self) -> list[tuple[int, float]]:
        """(layers dropped, channel fraction) of every candidate, the base model first: the denominator."""
        grid = [(d, f) for d in self.layers_dropped for f in self.channel_fractions]
        return [(0, 0.0)] + [key for key in dict.fromkeys(grid) if key != (0, 0.0)]


@dataclass
class Candidate:
    layers_dropped: int
    channel_fraction: float
    artifact: str  # the bundle artifact name, e.g. "gguf-int4"
    megabytes: float
    ppl_ratio: float  # the artifact's perplexity / the uncompressed fp32 model's, on the parity text
    decode_tok_s: float | None
    meets_budget: bool = False
    pareto: bool = False


@dataclass
class BudgetResult:
    max_mb: float
    max_ppl_ratio: float
    base_perplexity: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pareto_front(candidates: list[Candidate]) -> None:
    """Mark the candidates no other one beats on size, perplexity and speed at once."""

    def dominates(a: Candidate, b: Candidate) -> bool:
        speed_a, speed_b = a.decode_tok_s or 0.0, b.decode_tok_s or 0.0
        no_worse = a.megabytes <= b.megabytes and a.ppl_ratio <= b.ppl_ratio and speed_a >= speed_b
        better = a.megabytes < b.megabytes or a.ppl_ratio < b.ppl_ratio or speed_a > speed_b
        return no_worse and better

    for c in candidates:
        c.pareto = not any(dominates(other, c) for other in candidates if other is not c)


def choose(candidates: list[Candidate], max_mb: float, max_ppl_ratio: float) -> Candidate | None:
    for c in candidates:
        c.meets_budget = c.megabytes <= max_mb and c.ppl_ratio <= max_ppl_ratio
    fitting = [c for c in candidates if c.meets_budget]
    return min(fitting, key=lambda c: (c.megabytes, c.ppl_ratio)) if fitting else None


def _is_budget_output(path: Path) -> bool:
    """A folder an earlier budget search wrote (budget.json) or a compressed model folder."""
    return is_compressed_model(path) or (path.is_dir() and not path.is_symlink() and (path / BUDGET_FILE).is_file())


def _compressed(model: str | Path | None, folder: Path, dropped: int, fraction: float, space: SearchSpace) -> Path:
    """One candidate of the grid compressed into `folder`."""
    recipe = CompressRecipe(
        drop_layers=LayerDrop(dropped, space.importance) if dropped else None,
        prune=Prune("channels", fraction) if fraction else None,
        distill=DistillSettings(steps=space.distill_steps) if space.distill_steps else None,
    )
    compress_model(model, folder, recipe)
    return folder


def _candidates(manifest: Any, dropped: int, fraction: float, base_perplexity: float) -> list[Candidate]:
    """Every measured artifact of one candidate's bundle, its perplexity against the base model's."""
    found = []
    for artifact in manifest.artifacts:
        if artifact.format == "safetensors" or not artifact.parity:
            continue
        profile = artifact.profile or {}
        found.append(
            Candidate(
                layers_dropped=dropped,
                channel_fraction=fraction,
                artifact=artifact.name,
                megabytes=round(artifact.bytes / 1e6, 2),
                ppl_ratio=round(artifact.parity["perplexity"] / base_perplexity, 4),
                decode_tok_s=profile.get("decode_tok_s"),
            )
        )
    return found


def search_budget(
    model: str | Path | None,
    output: str | Path,
    *,
    max_mb: float,
    max_ppl_ratio: float,
    export_options: Any,
    space: SearchSpace | None = None,
    overwrite: bool = False,
    step: StepHook | None = None,
) -> BudgetResult:
    """Measure every candidate; write the chosen compressed model folder (with budget.json) to `output`.

    When no candidate meets the budget nothing is written but budget.json beside a
    message; the result still lists every candidate so the user sees what is closest.
    """
    from edgelm.export import export_bundle

    space = space or SearchSpace()
    step = step or (lambda _name: nullcontext())
    output = Path(output).absolute()
    check_replaceable(output, overwrite, (Path(model),) if model is not None else (), ours=_is_budget_output)
    options = replace(export_options, allow_drift=True, overwrite=True)
    result: BudgetResult | None = None
    with scratch_beside(output) as tmp:
        folders: dict[tuple[int, float], Path | None] = {}
        for key in space.grid():
            dropped, fraction = key
            name = f"drop{dropped}-channels{int(fraction * 100)}"
            source: Path | str | None = model
            if dropped or fraction:
                with step(f"Compressing: {dropped} layers dropped, {fraction:.0%} MLP channels pruned"):
                    source = _compressed(model, Path(tmp) / name, dropped, fraction, space)
            folders[key] = source if isinstance(source, Path) else None
            with step(f"Exporting and measuring {name}"):
                manifest = export_bundle(source, Path(tmp) / f"bundle-{name}", options)
            if result is None:  # the uncompressed model's fp32 perplexity is every ratio's denominator
                base = next(a.parity["reference_perplexity"] for a in manifest.artifacts if a.parity)
                result = BudgetResult(max_mb, max_ppl_ratio, base_perplexity=base)
            result.candidates += _candidates(manifest, dropped, fraction, result.base_perplexity)
            shutil.rmtree(Path(tmp) / f"bundle-{name}")
        assert result is not None
        pareto_front(result.candidates)
        result.chosen = choose(result.candidates, max_mb, max_ppl_ratio)
        final = Path(tmp) / "result"
        if result.chosen and folders[(result.chosen.layers_dropped, result.chosen.channel_fraction)] is not None:
            shutil.move(str(folders[(result.chosen.layers_dropped, result.chosen.channel_fraction)]), final)
        else:  # nothing fits, or the uncompressed model already does: write only the search
            final.mkdir()
        (final / BUDGET_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        if os.path.lexists(output):
            check_replaceable(output, overwrite, ours=_is_budget_output)
        old = move_into_place(final, output, replace_existing=overwrite)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return result
