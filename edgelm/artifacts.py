"""One artifact of a bundle: export it by the first recipe of its ladder, measure it, and on a
gate miss try the next, more faithful recipe.

A quantized artifact (int8, int4) is first quantized from the activation-aware scaled model
(edgelm.calibration), then, if that misses its gate, from the plain fp32 weights, then by
the format's own more faithful types (an exporter's `fallbacks`, e.g. GGUF int4: Q5_K_M,
then Q6_K), each held to the gate of the recipe it stands in for. If none holds, the
artifact is left out of the bundle and the manifest says why: one unfaithful quantization
does not fail the export of a user's model. A float artifact that misses its gate is a
conversion error and still fails the export (unless --allow-drift keeps it).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.background import (
    BackgroundExport,
    BackgroundExports,
    torch_threads,
    worth_a_second_process,
)
from edgelm.bundle import ArtifactEntry
from edgelm.calibration import Calibration
from edgelm.errors import VendorMismatchError
from edgelm.exporter import get_exporter
from edgelm.isolation import mark_trusted
from edgelm.model import SourceModel, sha256_file
from edgelm.profile import timed
from edgelm.session import get_runtime
from edgelm.vendors.check import VendorChecks

REFERENCE_FORMAT = "safetensors"
CHOICE_WINDOWS = 4  # calibration windows (of 512 tokens) an exporter's measured choice is made on
PARITY_SUMMARY = ("ppl_ratio", "top1_agreement", "mean_kl", "min_cosine")  # kept per attempt in the manifest
UNCALIBRATED = "none: round-to-nearest from the fp32 weights"
MIXED_FRACTIONS = (0.25, 0.5)  # mixed-precision rungs: this share of the most sensitive layers at 8 bits


@dataclass(frozen=True)
class Attempt:
    quant: str  # what the exporter is asked for (a --quant recipe or a format's own type)
    calibrated: bool  # quantized from the activation-aware scaled model
    eight_bit_share: float = 0.0  # mixed precision: this share of layers, most sensitive first, at 8 bits

    def describe(self) -> str:
        mixed = f", {self.eight_bit_share:.0%} of layers at 8 bits" if self.eight_bit_share else ""
        return f"{self.quant}{' (calibrated' + mixed + ')' if self.calibrated else mixed}"


def recipe_ladder(exporter: Any, quant: str, recipe: str, calibrate: bool) -> list[Attempt]:
    """The recipes tried for one artifact, in order, until one holds its gate: calibrated, plain,
    mixed precision by measured layer sensitivity (formats that can), the format's own
    more faithful types."""
    if not Calibration.applies_to(recipe):
        return [Attempt(quant, False)]
    ladder = ([Attempt(quant, True)] if calibrate else []) + [Attempt(quant, False)]
    if quant in exporter.mixed_precision:
        ladder += [Attempt(quant, calibrate, share) for share in MIXED_FRACTIONS]
    fallbacks = exporter.fallbacks.get(quant, ())
    return ladder + [Attempt(f, calibrate) for f in fallbacks]


def _remove(files: list[Path], root: Path) -> None:
    """Delete an attempt's files, and their folder if that leaves it empty (an artifact's own folder)."""
    for path in files:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in files}:
        if folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


class ArtifactBuilder:
    """Builds every artifact of one export; owns which model variant each format's scratch
    files were made from (an exporter keeps one fp32 intermediate between its recipes)."""

    def __init__(
        self,
        model: Any,
        source: SourceModel,
        work: Path,
        options: Any,
        evaluation: Any,
        reference: Any,
        step: Callable[[str], AbstractContextManager[Any]],
        calibration: Calibration,
        vendors: VendorChecks | None = None,
    ) -> None:
        self.model, self.source, self.work, self.options = model, source, work, options
        self.evaluation, self.reference, self.step, self.calibration = evaluation, reference, step, calibration
        self.vendors = vendors  # None: no vendor-runtime checks (encoders, or switched off)
        self._variant: dict[str, str] = {}  # format -> the model variant its scratch files hold
        self.omitted: list[dict[str, Any]] = []
        self.background = BackgroundExports()  # first recipes being exported by worker processes
        self._background_calibration: dict[tuple[str, Attempt], dict[str, Any] | str] = {}

    def _ladder(self, fmt: str, quant: str) -> tuple[Any, str, str, list[Attempt]]:
        """(exporter, artifact name, the gate recipe, the recipes to try) for one artifact."""
        exporter = get_exporter(fmt)
        name = f"{fmt}-{quant}" if fmt != REFERENCE_FORMAT else "reference-fp32"
        # the gate of the recipe a format-specific type stands for (GGUF Q4_0 → int4, ...)
        recipe = exporter.gate_recipe(quant)
        return exporter, name, recipe, recipe_ladder(exporter, quant, recipe, self.options.calibrate)

    def grouped_by_recipe(self, plan: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """`plan` with the artifacts of one calibration recipe next to each other (every int4,
        then every int8, in plan order otherwise): a recipe's scaled copy of the model is freed
        once its last artifact is built, so only one copy is held at a time instead of two for
        most of the export (2 GB at 0.5B parameters, 5 GB at 1.24B)."""
        recipes = [self._ladder(fmt, quant)[2] for fmt, quant in plan]
        first = {recipe: recipes.index(recipe) for recipe in recipes}
        return [item for _, item in sorted(zip(recipes, plan, strict=True), key=lambda pair: first[pair[0]])]

    def start_background_exports(self, plan: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Start the first recipe of each artifact whose exporter is slow single-threaded Python
        (`exports_in_background`) in a worker process, when there is other work to overlap it
        with, the model is big enough to gain and memory holds a copy per worker; return the
        plan with those artifacts last, so their files are ready when their turn comes."""
        started = []
        for fmt, quant in plan:
            exporter, name, recipe, ladder = self._ladder(fmt, quant)
            first = ladder[0]
            if not exporter.exports_in_background or len(plan) - len(started) <= 2 or first.eight_bit_share:
                continue  # nothing to overlap with, or the recipe needs the layers' sensitivity first
            if not worth_a_second_process(self.model, workers=len(started) + 1):
                continue
            model, calibration = self._model_for(fmt, first, recipe)
            settings = self._gptq_settings(exporter, first, recipe)
            with self.step(f"Starting {name}'s export in a background process"):
                self.background.start(
                    (fmt, first),
                    BackgroundExport(
                        model, fmt, self.source, self.work, first.quant, name, settings, exporter.background_nice
                    ),
                )
            self._background_calibration[(fmt, first)] = calibration
            started.append((fmt, quant))
        return [item for item in plan if item not in started] + started

    def next_to_build(self, rest: list[tuple[str, str]]) -> tuple[str, str]:
        """The artifact of `rest` (what is left to build, in order) to build next: the first one,
        unless it is still being exported in a background process; then the first of `rest`
        whose worker has finished, waiting for one when every artifact left is in a worker. On
        the default model the TFLite worker finished 190 s before the ExecuTorch one: its parity
        and profile now run while ExecuTorch still lowers, not after."""
        keys = {self._background_key(item): item for item in rest}
        if not self.background.running(self._background_key(rest[0])):
            return rest[0]
        ready = [item for item in rest if not self.background.running(self._background_key(item))]
        if ready or len(rest) == 1:  # one worker left: its own step waits for it
            return (ready or rest)[0]
        names = ", ".join(self._ladder(*item)[1] for item in rest)
        with self.step(f"Waiting for the first of {names} to finish in its background process"):
            return keys[self.background.wait_for_any(list(keys))]

    def _background_key(self, item: tuple[str, str]) -> tuple[str, Attempt]:
        """The key a background export of `item` is started under: its format and first recipe."""
        exporter, _, _, ladder = self._ladder(*item)
        return (exporter.format, ladder[0])

    def build(self, fmt: str, quant: str) -> tuple[ArtifactEntry | None, str | None]:
        """(entry or None when left out, the gate failure to report or None)."""
        exporter, name, recipe, ladder = self._ladder(fmt, quant)
        tried: list[dict[str, Any]] = []
        files: list[Path] = []
        for number, attempt in enumerate(ladder):
            _remove(files, self.work)  # the previous attempt missed its gate
            label = name if number == 0 else f"{name} as {attempt.describe()}"
            entry, failure, files = self._attempt(exporter, name, label, attempt, recipe)
            tried.append(
                {
                    "quant": attempt.quant,
                    "calibrated": attempt.calibrated,
                    "result": failure or "passed",
                    **({"layers_at_8_bits": entry.recipe["layers_at_8_bits"]} if attempt.eight_bit_share else {}),
                    **{k: v for k, v in (entry.parity or {}).items() if k in PARITY_SUMMARY},
                }
            )
            entry.recipe["attempts"] = tried
            if failure is None:
                return entry, None
        if self.options.allow_drift or not Calibration.applies_to(recipe):
            return entry, f"{name}: {failure}"
        _remove(files, self.work)
        self.omitted.append({"reason": f"every recipe missed the {recipe} gate", "attempts": tried})
        return None, None

    def release_unneeded(self, rest: list[tuple[str, str]]) -> None:
        """Free the calibration state (scaled copies of the model, GPTQ statistics) that none of
        the artifacts still to build in `rest` will use."""
        keep = {self._ladder(fmt, quant)[2] for fmt, quant in rest} if self.options.calibrate else set()
        self.calibration.release(keep)
        gc.collect()

    def _model_for(self, fmt: str, attempt: Attempt, recipe: str) -> tuple[Any, dict[str, Any] | str]:
        if attempt.calibrated:
            with self.step(f"Calibrating {recipe} scales on the calibration text"), self._own_share():
                model, record = self.calibration.scaled_model(recipe)
            variant = f"calibrated-{recipe}"
        else:
            model, record, variant = self.model, UNCALIBRATED, "source"
        if self._variant.get(fmt, variant) != variant:
            get_exporter(fmt).finish(self.work)  # its scratch files were made from another variant
        self._variant[fmt] = variant
        return model, record

    def _gptq_settings(self, exporter: Any, attempt: Attempt, recipe: str) -> dict[str, Any]:
        """The exporter's GPTQ input (the layers' input statistics on the calibration text) for a
        calibrated attempt of a recipe it picks codes for by GPTQ; else nothing."""
        if not (attempt.calibrated and recipe in exporter.gptq):
            return {}
        with self.step(f"Collecting {recipe} layer inputs for GPTQ on the calibration text"), self._own_share():
            return {"hessians": self.calibration.hessians(recipe)}

    def _exported(
        self, exporter: Any, name: str, label: str, attempt: Attempt, recipe: str
    ) -> tuple[Any, Any, dict[str, Any]]:
        """The attempt's artifact, from its background process or exported here now: (artifact,
        the calibration it was made with, the exporter settings used)."""
        from edgelm.export import _export_one

        settings: dict[str, Any] = {}
        pending = self.background.take((exporter.format, attempt))
        if pending is not None:
            calibration = self._background_calibration.pop((exporter.format, attempt))
            waiting = (
                self.step(f"Waiting for {label}'s export in its background process")
                if not pending.finished()
                else contextlib.nullcontext()
            )
            with waiting:
                artifact, seconds, peak, phases = pending.result()
            getattr(self.step, "record_background", lambda *_: None)(
                f"Exporting {label} (background process)", seconds, peak, phases
            )
        else:
            model, calibration = self._model_for(exporter.format, attempt, recipe)
            if attempt.eight_bit_share:
                settings["layers_8bit"] = self.calibration.sensitive_layers(recipe, attempt.eight_bit_share)
            settings.update(self._gptq_settings(exporter, attempt, recipe))
            if attempt.calibrated and attempt.quant in exporter.measured_choice:
                settings["calibration_windows"] = self.calibration.batches()[:CHOICE_WINDOWS]
            with self.step(f"Exporting {label}"), self._own_share():
                artifact = _export_one(exporter, model, self.source, self.work, attempt.quant, name, **settings)
        return artifact, calibration, settings

    def _attempt(
        self, exporter: Any, name: str, label: str, attempt: Attempt, recipe: str
    ) -> tuple[ArtifactEntry, str | None, list[Path]]:
        """Export, open and measure one attempt: (entry, gate failure or None, the files it wrote)."""
        artifact, calibration, settings = self._exported(exporter, name, label, attempt, recipe)
        mark_trusted(artifact.path)  # written by this export: opened in this process for parity
        runtime = get_runtime(exporter.runtime)
        threads = self._threads_beside_workers()
        with self.step(f"Loading {name} in {runtime.name}"), self.background.paused(), torch_threads(threads):
            session, load_s = timed(runtime.open, artifact.path, threads=threads)
        file_bytes = artifact.path.stat().st_size + sum(f.stat().st_size for f in artifact.extra_files)
        with self.step(
            f"Measuring parity of {name} on real text" + (" and profiling it" if self.options.profile else "")
        ):
            with torch_threads(threads):
                parity, failure = self.evaluation.parity(session, self.reference, recipe)
            profile = None
            if self.options.profile:
                with self.background.paused():  # every timing is taken on a machine doing nothing else
                    if threads != self.options.threads:  # parity ran beside a worker, on the cores it left
                        session.close()
                        session = runtime.open(artifact.path, threads=self._timing_threads())
                    profile = self.evaluation.profile(session, load_s, file_bytes)
        session.close()  # before the vendor runtime loads its own copy of the weights
        vendor = None
        if failure is None and self.vendors is not None and self.vendors.covers(exporter.format):
            with self.step(f"Running {name} in its vendor's LLM runtime"), self.background.paused():
                reopen = lambda: runtime.open(artifact.path, threads=self._timing_threads())  # noqa: E731
                vendor = self.vendors.run(exporter.format, artifact.path, self.work, reopen)
        if vendor is not None and vendor.failed and not self.options.allow_vendor_mismatch:
            raise VendorMismatchError(
                f"{name}: {vendor.result[len('failed: ') :]} (nothing written; --allow-vendor-mismatch keeps it)"
            )
        entry = ArtifactEntry(
            name=name,
            format=exporter.format,
            path=artifact.path.relative_to(self.work).as_posix(),
            sha256=sha256_file(artifact.path),
            bytes=file_bytes,
            quant=artifact.quant,
            runtime=runtime.name,
            runtime_version=runtime.version(),
            built_by=artifact.built_by,
            signature=artifact.signature,
            parity=parity,
            profile=profile,
            recipe={
                "gate_recipe": recipe,
                "chosen": attempt.quant,
                "calibration": calibration,
                **({"layers_at_8_bits": list(settings["layers_8bit"])} if "layers_8bit" in settings else {}),
            },
            vendor_runtimes=[vendor.to_dict()] if vendor else [],
        )
        written = [self.work / rel for rel in (vendor.files if vendor else [])]
        return entry, failure, [artifact.path, *artifact.extra_files, *written]

    def _threads_beside_workers(self) -> int | None:
        """Threads for the export's own work now: the user's --threads, else, while workers
        export, the cores they leave (BackgroundExports.cores_left), else the runtime's default."""
        return self.options.threads or self.background.cores_left()

    def _timing_threads(self) -> int:
        """Threads for what is timed (workers paused): the user's --threads, else every core,
        set explicitly — a runtime whose thread pool is process-wide (ExecuTorch's, torch's)
        keeps the count a parity session beside a worker gave it."""
        return self.options.threads or os.cpu_count() or 1

    def _own_share(self) -> AbstractContextManager[None]:
        """torch's threads for a step of the export's own (calibration, an export here) set to
        the cores the workers leave while it starts."""
        return torch_threads(self._threads_beside_workers())

    def finish_all(self) -> None:
        """Stop any background export still running; drop the scratch files exporters kept
        between their recipes."""
        self.background.close()
        self.calibration.release(set())  # its files in the work folder go before the bundle is sealed
        for fmt in self._variant:
            get_exporter(fmt).finish(self.work)
