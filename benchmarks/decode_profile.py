"""Where one decode step's time goes, operator type by operator type, in onnxruntime-genai (the
ONNX vendor runtime an app ships): edgelm's ONNX files of a bundle and the peer builder's files
(benchmarks/peers.py's cache), same prompt, same threads, each in a fresh process, profiled by
onnxruntime's own profiler (genai's `enable_profiling` runtime option: one trace per step).

Per file it reports the median step, the time of every operator type, and for the weight
matmuls (MatMulNBits, MatMul on an initializer) the bytes they read per step and the speed they
read them at, beside this machine's read bandwidth over an array of that many bytes (the bound
benchmarks/peers.py uses, here over the weights the kernels read rather than the whole file,
which may hold a float embedding table read one row per step): which part of a step is the
weights' kernels, how close those kernels come to the bound, and what the rest of the graph
costs. The profiler costs several microseconds per node, so a profiled step is slower than an
unprofiled one, most in graphs of many small nodes; the unprofiled step time of the same process
is reported beside it, and the kernels' read speed is a lower bound.

An edgelm int4 file with block-bias branches (exporters/onnx_block_bias.py) is also stepped
once more with its branches taken out: a speed probe only (its numbers are not the model's), whose
unprofiled step against the file's own is what the branches cost without the profiler's share.

    python benchmarks/decode_profile.py dist/smollm2 --out benchmarks/results/decode_profile.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WEIGHT_OPS = ("MatMulNBits", "MatMul", "Gemm")  # whose initializer input is read whole every step
PEERS = ("genai-builder-int4", "genai-builder-int4-k_quant_mixed", "genai-builder-int8")


def weight_bytes_by_node(path: Path) -> dict[str, int]:
    """Bytes of initializers each weight-reading node takes (packed weights, scales, zero points),
    by node name, from the graph alone (external data is sized from its `length` entry); the
    block-bias branches' small MatMuls are counted with their branches, not here."""
    import onnx

    from edgelm.exporters.onnx_block_bias import branch_node_names

    model = onnx.load(str(path), load_external_data=False)
    branches = branch_node_names(node.name for node in model.graph.node)
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        sizes[init.name] = int(external["length"]) if "length" in external else len(init.raw_data)
    return {
        node.name: sum(sizes.get(name, 0) for name in node.input)
        for node in model.graph.node
        if node.op_type in WEIGHT_OPS and any(name in sizes for name in node.input) and node.name not in branches
    }


def without_block_bias(path: Path, folder: Path) -> Path:
    """A copy of an int4 file and its genai folder with every block-bias branch taken out (each
    MatMulNBits answers for its corrected output directly): a speed probe of what the branches
    cost, whose numbers are not the model's (the systematic block offsets go uncorrected)."""
    import onnx

    from edgelm.exporters.onnx_block_bias import branch_node_names

    model = onnx.load(str(path))
    graph = model.graph
    branches = branch_node_names(n.name for n in graph.node)
    corrected = {n.input[0]: n.output[0] for n in graph.node if n.name in branches and n.name.endswith("_corrected")}
    kept = [n for n in graph.node if n.name not in branches]
    for node in kept:
        node.output[:] = [corrected.get(name, name) for name in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    folder.mkdir(parents=True, exist_ok=True)
    for other in path.parent.iterdir():
        if other.suffix == ".json":
            shutil.copyfile(other, folder / other.name)
    onnx.save(model, str(folder / path.name))
    return folder / path.name


def profile_file(spec: dict[str, Any]) -> dict[str, Any]:
    """In this process: the prompt, `warmup` unprofiled steps (timed), then `steps` profiled ones."""
    import onnxruntime_genai as og

    from edgelm.vendors.onnxruntime_genai import open_model

    folder, threads = Path(spec["folder"]), spec["threads"]
    model = open_model(folder, threads)
    ids = spec["prompt_ids"]
    params = og.GeneratorParams(model)
    total = len(ids) + spec["warmup"] + spec["steps"] + 1
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()  # the prompt's step
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        generator.generate_next_token()
    unprofiled_ms = (time.perf_counter() - start) * 1e3 / spec["warmup"]
    with tempfile.TemporaryDirectory() as traces:
        generator.set_runtime_option("enable_profiling", str(Path(traces) / "step"))
        for _ in range(spec["steps"]):
            generator.generate_next_token()
        generator.set_runtime_option("enable_profiling", "0")
        del generator
        steps = [json.loads(p.read_text()) for p in sorted(Path(traces).glob("step*.json"))]
    return {"unprofiled_step_ms": unprofiled_ms, "steps": [step_times(events) for events in steps]}


def step_times(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One trace: the whole run's microseconds and each node's kernel time by node name and type."""
    run_us = next(e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    nodes = {
        e["name"].removesuffix("_kernel_time"): (e["args"]["op_name"], e["dur"])
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    }
    return {"run_us": run_us, "nodes": nodes}


def summarize(
    name: str, path: Path, measured: dict[str, Any], weights: dict[str, int], bound_gb_s: float
) -> dict[str, Any]:
    """Medians over the profiled steps: per operator type, and the weight matmuls (`weights`: their
    bytes by node name) against `bound_gb_s`, the read bandwidth over an array of those bytes."""
    from edgelm.exporters.onnx_block_bias import branch_node_names

    steps = measured["steps"]
    branch_nodes = branch_node_names(steps[-1]["nodes"])
    by_type: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    weight_us, branch_us, other_us = [], [], []
    for step in steps:
        per_type: dict[str, float] = defaultdict(float)
        weight = branch = 0.0
        for node, (op, us) in step["nodes"].items():
            per_type[op] += us
            weight += us if node in weights else 0.0
            branch += us if node in branch_nodes else 0.0
        for op, us in per_type.items():
            by_type[op].append(us)
        weight_us.append(weight)
        branch_us.append(branch)
        other_us.append(sum(per_type.values()) - weight - branch)
    for op, _ in steps[-1]["nodes"].values():
        counts[op] += 1
    branches = len(branch_nodes)
    weight_ms = statistics.median(weight_us) / 1e3
    read = sum(weights.values())
    kernel_gb_s = read / (weight_ms / 1e3) / 1e9
    return {
        "file": name,
        "path": str(path),
        "bytes": sum(p.stat().st_size for p in path.parent.iterdir() if p.suffix in (".onnx", ".data")),
        "nodes_run_per_step": len(steps[-1]["nodes"]),
        "step_ms_profiled": statistics.median(s["run_us"] for s in steps) / 1e3,
        "step_ms_unprofiled": measured["unprofiled_step_ms"],
        "weight_matmuls": {
            "nodes": len(weights),
            "bytes_read_per_step": read,
            "ms": weight_ms,
            "read_gb_s": kernel_gb_s,
            "fraction_of_bound": kernel_gb_s / bound_gb_s,
        },
        "block_bias_branch_nodes": branches,
        "block_bias_branches_ms": statistics.median(branch_us) / 1e3,
        "other_nodes": len(steps[-1]["nodes"]) - len(weights) - branches,
        "other_nodes_ms": statistics.median(other_us) / 1e3,
        "read_bandwidth_at_weights_size_gb_s": bound_gb_s,
        "by_op_type_ms": {
            op: {"nodes": counts[op], "ms": statistics.median(values) / 1e3}
            for op, values in sorted(by_type.items(), key=lambda item: -statistics.median(item[1]))
        },
    }


def has_block_bias(path: Path) -> bool:
    import onnx

    from edgelm.exporters.onnx_block_bias import branch_node_names

    return bool(branch_node_names(n.name for n in onnx.load(str(path), load_external_data=False).graph.node))


def onnx_files(bundle: Path, cache: Path) -> list[tuple[str, Path]]:
    """edgelm's ONNX artifacts (those its vendor check prepared for genai) and the builder's, where built."""
    from edgelm.bundle import read_bundle

    ours = [
        (f"edgelm {entry.name}", bundle / entry.path)
        for entry in read_bundle(bundle).artifacts
        if entry.format == "onnx" and (bundle / entry.path).parent.joinpath("genai_config.json").exists()
    ]
    peers = [(name, cache / name / "model.onnx") for name in PEERS if (cache / name / "build.json").exists()]
    return ours + peers


def main() -> None:
    if sys.argv[1:2] == ["--profile"]:
        print(json.dumps(profile_file(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path, help="an `edgelm export --target android` bundle of the default model")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgelm" / "peers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "decode_profile.json")
    parser.add_argument("--steps", type=int, default=32, help="profiled decode steps per file")
    parser.add_argument("--warmup", type=int, default=32, help="unprofiled steps first (timed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from common import parity_prompt, print_and_save, read_bandwidth_gb_s

    from edgelm.parity import GREEDY_PROMPT_TOKENS
    from edgelm.profile import device_record
    from edgelm.tokenizer import Tokenizer

    bundle = args.bundle.resolve()
    tokenizer = Tokenizer(bundle / "tokenizer")
    prompt_ids = tokenizer.encode(parity_prompt(bundle / "tokenizer"))
    rows = []
    probes = Path(tempfile.mkdtemp(prefix="edgelm-decode-profile-"))
    files = onnx_files(bundle, args.cache.resolve())
    branched = [(n, p) for n, p in files if n.startswith("edgelm") and has_block_bias(p)]
    files += [
        (f"{n} without its block-bias branches (speed probe)", without_block_bias(p, probes / n)) for n, p in branched
    ]
    for name, path in files:
        spec = {"folder": str(path.parent), "prompt_ids": prompt_ids, "threads": args.threads}
        spec |= {"steps": args.steps, "warmup": args.warmup}
        done = subprocess.run(
            [sys.executable, __file__, "--profile", json.dumps(spec)], check=True, capture_output=True, text=True
        )
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        weights = weight_bytes_by_node(path)
        bound = read_bandwidth_gb_s(args.threads, -(-sum(weights.values()) // 2**20))
        rows.append(summarize(name, path, measured, weights, bound))
        row = rows[-1]
        print(
            f"{name}: step {row['step_ms_unprofiled']:.2f} ms unprofiled, {row['step_ms_profiled']:.2f} profiled; "
            f"weight matmuls {row['weight_matmuls']['ms']:.2f} ms at {row['weight_matmuls']['read_gb_s']:.1f} GB/s "
            f"({row['weight_matmuls']['fraction_of_bound']:.0%} of {row['read_bandwidth_at_weights_size_gb_s']} GB/s), "
            f"block-bias branches ({row['block_bias_branch_nodes']} nodes) {row['block_bias_branches_ms']:.2f} ms, "
            f"other {row['other_nodes']} nodes {row['other_nodes_ms']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    shutil.rmtree(probes)
    print_and_save(
        {
            "bundle": str(bundle),
            "prompt_tokens": GREEDY_PROMPT_TOKENS,
            "threads": args.threads,
            "profiled_steps": args.steps,
            "read_bandwidth_gb_s": read_bandwidth_gb_s(args.threads),
            "device": device_record(),
            "how": __doc__,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
