"""`edgelm compress`: base model → (drop layers) → (prune) → (distill) → an ordinary model folder.

The folder holds config.json + model.safetensors (transformers loads it), the tokenizer,
and compression.json (the recipe, the corpus used, held-out perplexity after every step),
so `edgelm export FOLDER` takes it like any other checkpoint and records where it came from.
The folder is written atomically: a failed or interrupted run leaves nothing at the path.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelm.bundle import atomic_bundle_dir
from edgelm.compress.corpus import Corpus, build_corpus, token_stream
from edgelm.compress.distill import DistillResult, DistillSettings, distill
from edgelm.compress.layers import choose_layers_to_drop, drop_layers
from edgelm.compress.measure import mean_nll, perplexity, windows
from edgelm.compress.prune import prunable_linears, prune
from edgelm.compress.recipe import CompressionRecord, CompressRecipe
from edgelm.model import SourceModel, inspect_source, load_reference_model
from edgelm.tokenizer import Tokenizer

StepHook = Callable[[str], AbstractContextManager[Any]]
DistillHook = Callable[[int, float, float], None]


@dataclass
class TextSplits:
    """Token ids of the cleaned corpus, split: train (training, calibration) and held-out (evaluation)."""

    corpus: Corpus
    train: list[int]
    heldout: list[int]

    @classmethod
    def build(cls, tokenizer: Tokenizer) -> TextSplits:
        corpus = build_corpus()
        eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        return cls(corpus, token_stream(corpus.train, encode, eos), token_stream(corpus.heldout, encode, eos))

    def describe(self) -> dict[str, Any]:
        return self.corpus.describe() | {"train_tokens": len(self.train), "heldout_tokens": len(self.heldout)}


def _set_threads() -> None:
    """Use every core unless the caller said otherwise (torchrun sets OMP_NUM_THREADS per process)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def load_with_tokenizer(model: str | Path | None, work: Path, allow_pickle: bool = False) -> tuple[SourceModel, Any, Tokenizer]:
    """Load a model (folder, GGUF, None = default) in fp32 and its tokenizer, saved under `work`."""
    source = inspect_source(model, allow_pickle=allow_pickle)
    loaded = load_reference_model(source, work)
    return source, loaded, Tokenizer(work)


def compress_model(model: str | Path | None, output: str | Path, recipe: CompressRecipe, *,
                   overwrite: bool = False, allow_pickle: bool = False, step: StepHook | None = None,
                   on_distill_step: DistillHook | None = None) -> CompressionRecord:
    """Run `recipe` on `model` and write the compressed model folder to `output`."""
    step = step or (lambda _name: nullcontext())
    _set_threads()
    output = Path(output)
    with atomic_bundle_dir(output, overwrite=overwrite) as work:
        with step("Loading the base model"):
            source, teacher, tokenizer = load_with_tokenizer(model, work / ".tokenizer", allow_pickle)
            if source.task != "text-generation" and recipe.distill:
                from edgelm.errors import UnsupportedError

                raise UnsupportedError(f"distillation trains causal language models; {source.model_id} is a {source.task} model")
        with step("Cleaning and splitting the training text"):
            text = TextSplits.build(tokenizer)
            calibration = windows(text.train, recipe.calibration_window, recipe.calibration_tokens)
            heldout = windows(text.heldout, recipe.eval_window, recipe.eval_tokens)
        lm = source.task == "text-generation"  # encoders are scored by calibration loss only where it exists
        ppl: dict[str, float] = {}
        if lm:
            with step("Measuring the base model's held-out perplexity"):
                ppl["base"] = round(perplexity(teacher, heldout), 4)
        student = copy.deepcopy(teacher)
        record_steps: list[dict[str, Any]] = []
        kept: list[int] | None = None
        masks: dict[str, Any] = {}
        if recipe.drop_layers:
            spec = recipe.drop_layers
            with step(f"Scoring layers ({spec.importance}) and dropping {spec.count}"):
                chosen, scores = choose_layers_to_drop(student, spec.count, spec.importance, calibration, mean_nll,
                                                       on_score=getattr(step, "note", None))
                kept = drop_layers(student, chosen)
            if lm:
                ppl["after_drop_layers"] = round(perplexity(student, heldout), 4)
            record_steps.append({"step": "drop_layers", "dropped": chosen, "kept": kept, "scores": scores})
        if recipe.prune:
            spec_p = recipe.prune
            with step(f"Pruning ({spec_p.method}, {spec_p.sparsity:.0%})"):
                masks, change = prune(student, spec_p.method, spec_p.sparsity, calibration)
            if lm:
                ppl["after_prune"] = round(perplexity(student, heldout), 4)
            record_steps.append({"step": "prune", "method": spec_p.method, "sparsity": spec_p.sparsity, **change})
        if recipe.distill:
            with step(f"Distilling for {recipe.distill.steps} steps"):
                result = distill(teacher, student, text.train, recipe.distill, checkpoint_folder(output), masks=masks,
                                 layer_map=kept, on_step=on_distill_step)
            ppl["after_distill"] = round(perplexity(student, heldout), 4)
            record_steps.append({"step": "distill", **_distill_summary(result)})
        with step("Saving the compressed model"):
            record = CompressionRecord(
                base_model=source.model_id, base_model_sha256=source.sha256, recipe=recipe.to_dict(),
                corpus=text.describe(), perplexity=ppl,
                parameters={"before": count_parameters(teacher), "after": count_parameters(student)},
                steps=record_steps, kept_layers=kept,
            )
            save_model_folder(student, work / ".tokenizer", work, record)
    shutil.rmtree(checkpoint_folder(output), ignore_errors=True)
    return record


def checkpoint_folder(output: Path) -> Path:
    """Where distillation checkpoints live: beside the output, so an interrupted run can resume."""
    return output.with_name(output.name + ".checkpoints")


def _distill_summary(result: DistillResult) -> dict[str, Any]:
    return result.to_dict() | {"first_loss": result.losses[0] if result.losses else None,
                               "last_loss": result.losses[-1] if result.losses else None}


def save_model_folder(model: Any, tokenizer_dir: Path, folder: Path, record: CompressionRecord) -> None:
    """Weights as safetensors, config, tokenizer files and compression.json, into `folder`."""
    model.save_pretrained(str(folder), safe_serialization=True)
    for path in tokenizer_dir.iterdir():
        shutil.copy2(path, folder / path.name)
    shutil.rmtree(tokenizer_dir)
    record.write(folder)


def distill_folders(teacher_path: str | Path | None, student_path: str | Path, output: str | Path,
                    settings: DistillSettings, checkpoints: Path | None = None) -> dict[str, Any] | None:
    """Distill a student folder toward a teacher, on one process or under torchrun (see distill.py).

    Rank 0 writes the distilled folder (its compression.json extended with this step) and
    returns the record; other ranks return None.
    """
    import tempfile

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _set_threads()
    rank = dist.get_rank() if dist.is_initialized() else 0
    output = Path(output)
    checkpoints = checkpoints or checkpoint_folder(output)
    try:
        with tempfile.TemporaryDirectory(prefix="edgelm-distill-") as scratch:
            _, teacher, tokenizer = load_with_tokenizer(teacher_path, Path(scratch) / "teacher-tokenizer")
            _, student, _ = load_with_tokenizer(student_path, Path(scratch) / "tokenizer")
            text = TextSplits.build(tokenizer)
            heldout = windows(text.heldout, 512)
            previous = CompressionRecord.read(Path(student_path))
            before = perplexity(student, heldout) if rank == 0 else None  # other ranks wait at the first step
            progress = DistillProgress(settings.steps) if rank == 0 else None
            with progress or nullcontext():
                result = distill(teacher, student, text.train, settings, checkpoints, masks=_sparsity_masks(student, previous),
                                 layer_map=previous.kept_layers if previous else None,
                                 on_step=progress.update if progress else None)
            if rank != 0:
                return None
            record = previous or CompressionRecord(
                base_model=str(teacher_path or "default"), base_model_sha256="", recipe={}, corpus={}, perplexity={},
                parameters={"before": count_parameters(teacher), "after": count_parameters(student)})
            record.corpus = text.describe()
            record.recipe = record.recipe | {"distill": asdict(settings)}
            record.perplexity = {"base": round(perplexity(teacher, heldout), 4), **record.perplexity,
                                 "before_distill": round(before, 4), "after_distill": round(perplexity(student, heldout), 4)}
            record.steps = [*record.steps, {"step": "distill", **_distill_summary(result)}]
            with atomic_bundle_dir(output, overwrite=True) as work:
                save_model_folder(student, Path(scratch) / "tokenizer", work, record)
            shutil.rmtree(checkpoints, ignore_errors=True)
            return record.to_dict()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _sparsity_masks(model: Any, record: CompressionRecord | None) -> dict[str, Any]:
    """Keep an unstructured / 2:4 pruned student's zeros at zero while it trains."""
    if not record or not any(s.get("step") == "prune" and not s.get("shrinks_files") for s in record.steps):
        return {}
    return {f"{name}.weight": (m.weight != 0).to(m.weight.dtype) for name, m in prunable_linears(model)}


class DistillProgress:
    """A rich progress bar (on stderr) for distillation steps, with the loss and training tokens/s.

    Started on the first step, so that it does not fight the step spinners drawn before.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> DistillProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]:.4f} · {task.fields[tps]:.0f} tok/s"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task("distill", total=self.steps, loss=loss, tps=tokens_per_s)
        self.progress.update(self.task, completed=step, loss=loss, tps=tokens_per_s)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
