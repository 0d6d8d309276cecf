"""Knowledge distillation: a smaller student learns the teacher's next-token distributions.

Loss = T² · KL(teacher ‖ student) on temperature-T softened logits, mean over tokens,
plus (optionally) `hidden_weight` · MSE between each student layer's output and the
output of the teacher layer it came from (a layer-reduced student keeps that map).

One process or several: under `torchrun` each process takes its share of every step's
batch, and the gradients are summed across processes (gloo on CPU, NCCL on GPUs) before
the optimizer step. Each process scales its loss by the *global* batch size, so the sum
is exactly the single-process mean and both runs follow the same loss curve.

Checkpoints (student weights, optimizer state, step, loss history) are written
atomically every `checkpoint_every` steps; a run given the same checkpoint folder
resumes from the last one and, because the batch of step s is a pure function of
(seed, s), ends with the same weights as a run that was never interrupted.

    torchrun --nproc-per-node 2 -m edgelm.compress.distill --teacher T --student S -o OUT --steps 300
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import EdgeLMError

CHECKPOINT_FILE = "distill-checkpoint.pt"


@dataclass
class DistillSettings:
    steps: int = 300
    batch_size: int = 8  # sequences per step, summed over all processes
    seq_len: int = 128
    lr: float = 2e-4
    warmup_steps: int = 20
    temperature: float = 2.0
    hidden_weight: float = 0.0  # weight of the hidden-state MSE term (0: logits only)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    train_embeddings: bool = False  # the (often tied) token table: large, and unchanged by a layer drop
    precision: str = "auto"  # matmuls in "bf16" (fp32 master weights) or "fp32"; auto: bf16 where the CPU/GPU has it


@dataclass
class DistillResult:
    steps: int
    tokens: int  # training tokens seen by the student, all processes
    seconds: float
    losses: list[float]  # one per step, the global-batch mean
    world_size: int
    resumed_from_step: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sequences(train_ids: list[int], seq_len: int) -> Any:
    """The training stream cut into [N, seq_len] sequences (the tail that does not fill one is dropped)."""
    import torch

    count = len(train_ids) // seq_len
    if count < 1:
        raise ValueError(f"the training text has {len(train_ids)} tokens, fewer than one {seq_len}-token sequence")
    return torch.tensor(train_ids[: count * seq_len]).view(count, seq_len)


def batch_rows(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Rows of the global batch of `step`: a fresh seeded shuffle of all sequences every epoch."""
    import torch

    orders: dict[int, list[int]] = {}  # a batch spans at most two epochs
    rows = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(g, count)
        if epoch not in orders:
            orders[epoch] = torch.randperm(
                count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            ).tolist()
        rows.append(orders[epoch][position])
    return rows


def learning_rate(step: int, settings: DistillSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def distillation_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """T² · KL(teacher ‖ student), summed over the vocabulary, mean over positions."""
    import torch.nn.functional as F

    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student.flatten(0, -2), log_p_teacher.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * t * t


def resolve_precision(precision: str) -> str:
    """ "auto" → bf16 where the hardware multiplies bf16 natively (AVX512-BF16/AMX, CUDA), else fp32."""
    import torch

    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def _trainable(student: Any, settings: DistillSettings) -> list[Any]:
    tables = {
        id(p)
        for m in (student.get_input_embeddings(), student.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    params = []
    for p in student.parameters():
        p.requires_grad_(settings.train_embeddings or id(p) not in tables)
        if p.requires_grad:
            params.append(p)
    return params


def _save_checkpoint(
    folder: Path, settings: DistillSettings, student: Any, optimizer: Any, step: int, losses: list[float]
) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT_FILE}.tmp"
    torch.save(
        {
            "step": step,
            "settings": json.dumps(asdict(settings), sort_keys=True),
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "losses": losses,
        },
        tmp,
    )
    os.replace(tmp, folder / CHECKPOINT_FILE)  # a crash mid-write leaves the previous checkpoint whole


def _resume(checkpoint_dir: Path | None, settings: DistillSettings, student: Any, optimizer: Any) -> tuple[int, list]:
    """(the step to start at, the losses so far): from the folder's checkpoint if it has one made
    with the same settings; EdgeLMError if it was made with others."""
    import torch

    if not (checkpoint_dir and (checkpoint_dir / CHECKPOINT_FILE).is_file()):
        return 0, []
    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=True)
    if state.get("settings") != json.dumps(asdict(settings), sort_keys=True):
        raise EdgeLMError(
            f"{checkpoint_dir}: its checkpoint was made with other distillation settings; "
            "delete the folder to start over, or rerun with the settings it was made with"
        )
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["losses"])


def _loss(
    teacher: Any, student: Any, batch: Any, settings: DistillSettings, layer_map: list[int] | None, autocast: Any
) -> Any:
    """The distillation loss of one batch: KL on the logits, plus the hidden-state MSE when asked."""
    import torch

    with torch.no_grad(), autocast:
        teacher_out = teacher(input_ids=batch, use_cache=False, output_hidden_states=bool(settings.hidden_weight))
    with autocast:
        student_out = student(input_ids=batch, use_cache=False, output_hidden_states=bool(settings.hidden_weight))
    loss = distillation_loss(student_out.logits, teacher_out.logits, settings.temperature)
    if settings.hidden_weight:
        pairs = [
            (student_out.hidden_states[i + 1], teacher_out.hidden_states[t + 1]) for i, t in enumerate(layer_map[:-1])
        ]  # the last output is after the final norm: skipped
        loss = loss + settings.hidden_weight * sum(
            torch.nn.functional.mse_loss(s.float(), t.float()) for s, t in pairs
        ) / max(1, len(pairs))
    return loss


def _sum_over_processes(params: list[Any], reported: Any) -> None:
    """All-reduce every gradient (one flat buffer) and the reported loss across processes."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    dist.all_reduce(reported)


def _update(
    optimizer: Any,
    params: list[Any],
    share: Any,
    settings: DistillSettings,
    world: int,
    named_masks: dict[str, tuple[Any, Any]],
) -> Any:
    """One optimizer step on this process's `share` of the global-batch loss (gradients summed
    over processes, clipped; pruned weights kept at zero). Returns the global loss."""
    import torch

    optimizer.zero_grad(set_to_none=False)
    share.backward()
    reported = share.detach().clone()
    if world > 1:
        _sum_over_processes(params, reported)
    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
    optimizer.step()
    with torch.no_grad():
        for p, mask in named_masks.values():
            p.mul_(mask)
    return reported


def _check_settings(settings: DistillSettings, world: int, layer_map: list[int] | None) -> None:
    if settings.batch_size % world:
        raise ValueError(f"batch size {settings.batch_size} does not split evenly over {world} processes")
    if settings.hidden_weight and layer_map is None:
        raise ValueError("hidden_weight needs the student→teacher layer map (a layer-reduced student has one)")


def distill(
    teacher: Any,
    student: Any,
    train_ids: list[int],
    settings: DistillSettings,
    checkpoint_dir: Path | None = None,
    *,
    masks: dict[str, Any] | None = None,
    layer_map: list[int] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> DistillResult:
    """Train `student` in place toward `teacher` for `settings.steps` optimizer steps.

    masks: parameter name -> 0/1 tensor (pruning) re-applied after every step, so the
    sparsity a pruning step reached survives training. layer_map[i]: the teacher layer
    student layer i came from (needed for hidden_weight > 0). on_step(step, loss,
    tokens_per_s) is called on every process after every step (rank 0 draws progress).
    """
    import torch
    import torch.distributed as dist

    rank, world = _world()
    _check_settings(settings, world, layer_map)
    data = sequences(train_ids, settings.seq_len)
    teacher.eval()
    student.train()
    params = _trainable(student, settings)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    precision = resolve_precision(settings.precision)
    device_type = "cuda" if next(student.parameters()).is_cuda else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
    named_masks = {name: (p, masks[name]) for name, p in student.named_parameters() if masks and name in masks}
    start, losses = _resume(checkpoint_dir, settings, student, optimizer)
    began = time.perf_counter()
    for step in range(start, settings.steps):
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        rows = batch_rows(step, settings.batch_size, len(data), settings.seed)[rank::world]
        batch = data[rows].to(next(student.parameters()).device)
        loss = _loss(teacher, student, batch, settings, layer_map, autocast)
        reported = _update(optimizer, params, loss * (len(rows) / settings.batch_size), settings, world, named_masks)
        losses.append(float(reported))
        if on_step:
            on_step(step + 1, losses[-1], settings.batch_size * settings.seq_len / (time.perf_counter() - tick))
        if checkpoint_dir and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            if rank == 0:
                _save_checkpoint(checkpoint_dir, settings, student, optimizer, step + 1, losses)
            if world > 1:
                dist.barrier()
    student.eval()
    return DistillResult(
        steps=settings.steps,
        tokens=(settings.steps - start) * settings.batch_size * settings.seq_len,
        seconds=round(time.perf_counter() - began, 2),
        losses=losses,
        world_size=world,
        resumed_from_step=start,
        settings=asdict(settings) | {"precision": precision},
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m edgelm.compress.distill` / `torchrun ... -m edgelm.compress.distill`: see the module docstring."""
    import argparse

    from edgelm.compress.pipeline import distill_folders

    parser = argparse.ArgumentParser(prog="edgelm.compress.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher model: HF folder or .gguf")
    parser.add_argument("--student", required=True, help="student model folder (e.g. `edgelm compress --drop-layers`)")
    parser.add_argument("-o", "--output", required=True, help="folder to write the distilled student to")
    parser.add_argument("--checkpoints", help="checkpoint folder (default: OUTPUT.checkpoints); reused to resume")
    defaults = DistillSettings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = DistillSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        result = distill_folders(
            args.teacher, args.student, args.output, settings, Path(args.checkpoints) if args.checkpoints else None
        )
    except EdgeLMError as err:  # bad input: one line, as the edgelm CLI prints it
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    if result is not None:
        last = result["steps"][-1]
        print(
            json.dumps(
                {
                    "output": args.output,
                    "perplexity": result["perplexity"],
                    "first_loss": last["first_loss"],
                    "last_loss": last["last_loss"],
                    "tokens": last["tokens"],
                    "seconds": last["seconds"],
                    "world_size": last["world_size"],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
