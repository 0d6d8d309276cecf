"""Calibration for quantized artifacts: the text, and the scaled model each recipe is quantized from.

The calibration text is the training split of `edgelm compress`'s cleaned corpus (CPython's
own documentation, with the parity text removed before anything else), so no artifact is
calibrated on the text its parity is measured on. One `Calibration` per export owns the
token windows and, per quantization recipe (int4, int8), the activation-aware scaled copy
of the model (edgelm.scaling) and its layers' GPTQ statistics, each made on first use. The
statistics live in files under the export's own work folder (`statistics`), not in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.scaling import PROXIES, capture_inputs, scale_for_quantization


@dataclass(frozen=True)
class CalibrationSettings:
    tokens: int = 16_384  # calibration tokens (windows of `window`, from the corpus's train split)
    window: int = 512


def calibration_windows(
    tokenizer: Any, settings: CalibrationSettings, max_length: int | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """[1, window] token-id tensors over the train split of the cleaned corpus, and its description."""
    from edgelm.compress.measure import windows
    from edgelm.compress.pipeline import TextSplits

    splits = TextSplits.build(tokenizer)
    window = min(settings.window, max_length or settings.window)
    batches = windows(splits.train, window, settings.tokens)
    description = {
        "text": "edgelm compress's cleaned corpus, train split (the parity text is removed first)",
        "tokens": sum(int(b.numel()) for b in batches),
        "window": window,
    }
    return batches, description


class Calibration:
    """The calibration windows of one export and the scaled model for each recipe, made lazily."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: CalibrationSettings | None = None,
        progress: Callable[[int, int], None] | None = None,
        statistics: Path | None = None,
    ) -> None:
        self.model = model
        self.statistics = statistics  # a folder for GPTQ statistics (None: kept in memory), made and removed here
        self.tokenizer = tokenizer
        self.settings = settings or CalibrationSettings()
        self.progress = progress
        self._batches: list[Any] | None = None
        self._text: dict[str, Any] = {}
        self._scaled: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._sensitivity: dict[str, list[float]] = {}
        self._inputs: dict | None = None  # the layers' inputs on the calibration text: one pass for every recipe
        self._hessians: dict[str, dict[str, Any]] = {}

    @staticmethod
    def applies_to(recipe: str) -> bool:
        return recipe in PROXIES

    def batches(self) -> list[Any]:
        if self._batches is None:
            limit = getattr(self.model.config, "max_position_embeddings", None)
            self._batches, self._text = calibration_windows(self.tokenizer, self.settings, limit)
        return self._batches

    def scaled_model(self, recipe: str) -> tuple[Any, dict[str, Any]]:
        """The model with activation-aware scales for `recipe` folded in, and what was done."""
        if recipe not in self._scaled:
            model, result = scale_for_quantization(
                self.model, self.batches(), PROXIES[recipe], self.progress, self._captured_inputs
            )
            self._scaled[recipe] = (model, result.describe() | {"calibration_text": self._text})
            self._sensitivity[recipe] = result.layer_sensitivity()
        return self._scaled[recipe]

    def _captured_inputs(self) -> dict:
        """The layers' inputs on the calibration text (edgelm.scaling.capture_inputs), captured on first use."""
        if self._inputs is None:
            self._inputs = capture_inputs(self.model, self.batches())
        return self._inputs

    def hessians(self, recipe: str) -> dict[str, Any]:
        """Per Linear of the scaled model for `recipe`, its inputs' Σ xxᵀ on the calibration text
        (edgelm.gptq), for exporters that pick their 4-bit codes by GPTQ; stored in files under
        `statistics` when given. A Linear whose weights already sit on the recipe's grid (a model
        dequantized from a Q4_1 GGUF) gets none: round-to-nearest reproduces it, so GPTQ has
        nothing to gain; the exporters round it, and the recipe's record counts it."""
        if recipe not in self._hessians:
            from edgelm.gptq import collect_hessians

            model, record = self.scaled_model(recipe)
            proxy = PROXIES[recipe]
            on_grid: list[bool] = []

            def wanted(module: Any) -> bool:
                on_grid.append(proxy.reproduces(module.weight))
                return not on_grid[-1]

            sums = collect_hessians(model, self.batches(), wanted=wanted)
            record["gptq_statistics"] = {
                "layers": len(on_grid) - sum(on_grid),
                "layers_on_the_grid": sum(on_grid),  # round-to-nearest reproduces them: no GPTQ
            }
            if self.statistics is not None:
                folder = self.statistics / recipe
                folder.mkdir(parents=True, exist_ok=True)
                for number, accumulator in enumerate({id(a): a for a in sums.values()}.values()):
                    accumulator.store(folder / f"{number}.npy")  # shared by the Linears that read one input
            self._hessians[recipe] = sums
        return self._hessians[recipe]

    def release(self, keep: set[str]) -> None:
        """Drop the scaled models and GPTQ statistics of every recipe not in `keep` (no artifact
        left to build needs them): each is a full copy of the weights, and a 0.5B model's GPTQ
        statistics are 2.3 GB more. The layers' captured inputs go once no recipe is left."""
        for recipe in [r for r in self._scaled if r not in keep]:
            del self._scaled[recipe]
            self._hessians.pop(recipe, None)
            if self.statistics is not None:
                shutil.rmtree(self.statistics / recipe, ignore_errors=True)
        if not keep:
            self._inputs = None
            if self.statistics is not None and self.statistics.is_dir() and not any(self.statistics.iterdir()):
                self.statistics.rmdir()

    def sensitive_layers(self, recipe: str, fraction: float) -> tuple[int, ...]:
        """The `fraction` of layers whose simulated `recipe` quantization errs most on the
        calibration text (at least one), most sensitive first."""
        self.scaled_model(recipe)
        sensitivity = self._sensitivity[recipe]
        count = max(1, round(fraction * len(sensitivity))) if sensitivity else 0
        return tuple(sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])[:count])
