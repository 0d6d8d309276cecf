"""Two facts the README's speed discussion rests on, measured on this machine:

1. How fast numpy reads an array with two threads, summing it (what `common.read_bandwidth_gb_s`
   did before) and taking its maximum (what it does now), over 1 GB (memory) and over arrays of
   the default model's file sizes (which a large last-level cache may hold).
2. onnxruntime's 4-bit MatMulNBits (block 32, accuracy_level 4, the recipe of edgelm's int4 ONNX)
   with integer (uint8-packed) zero points and with float zero points, which would represent a
   Q4_1 grid exactly without edgelm's block-bias branch: whether the float ones compute the
   exact product, and what a decode-sized product (one token, K=576, N=3072, 30 in a chain)
   costs with each.

    python benchmarks/kernel_facts.py --out benchmarks/results/kernel_facts.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_and_save, read_bandwidth_gb_s

from edgelm.profile import device_record

K, N, BLOCK, CHAIN = 576, 3072, 32, 30


def read_gb_s(megabytes: int, reduce: str, threads: int = 2, repeats: int = 7) -> float:
    """Best of `repeats` passes of numpy's `reduce` ("sum" or "max") over a `megabytes` array split between threads."""
    return round(read_bandwidth_gb_s(threads, megabytes, repeats, reduce), 1)


def matmul_nbits_session(zero_points: np.ndarray, packed: np.ndarray, scales: np.ndarray, chain: int):
    """An onnxruntime session of `chain` 4-bit MatMulNBits in a row (each output's first K columns
    feed the next), 2 threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for a, n in ((packed, "w"), (scales, "s"), (zero_points, "z"))]
    inits += [numpy_helper.from_array(np.array([v]), n) for v, n in ((0, "start"), (K, "end"), (-1, "axis"))]
    nodes, x = [], "x"
    for i in range(chain):
        attributes = {"K": K, "N": N, "bits": 4, "block_size": BLOCK, "accuracy_level": 4}
        inputs = [x, "w", "s", "z"]
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", **attributes))
        nodes.append(helper.make_node("Slice", [f"y{i}", "start", "end", "axis"], [f"x{i}"]))
        x = f"x{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def zero_point_facts(rounds: int = 5, calls: int = 50) -> dict[str, object]:
    rng = np.random.default_rng(0)
    blocks = K // BLOCK
    codes = rng.integers(0, 16, (N, blocks, BLOCK), dtype=np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (rng.random((N, blocks), dtype=np.float32) * 0.01).astype(np.float32)
    integer = rng.integers(0, 16, (N, blocks), dtype=np.uint8)
    kinds = {
        "uint8 zero points": integer[:, 0::2] | (integer[:, 1::2] << 4),
        "float zero points": integer.astype(np.float32) + 0.37,  # a Q4_1-like offset between two codes
    }
    x = rng.random((1, 1, K), dtype=np.float32)
    weights = (codes.astype(np.float32) - kinds["float zero points"][..., None]) * scales[..., None]
    exact = x.reshape(1, K) @ weights.reshape(N, K).T
    one = matmul_nbits_session(kinds["float zero points"], packed, scales, 1).run(None, {"x": x})[0]
    relative_error = float(np.abs(one.reshape(-1) - exact[0, :K]).max() / np.abs(exact).max())
    sessions = {name: matmul_nbits_session(z, packed, scales, CHAIN) for name, z in kinds.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):  # interleaved
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(calls):
                session.run(None, {"x": x})
            times[name].append((time.perf_counter() - start) / calls * 1000)
    medians = {name: round(float(np.median(t)), 2) for name, t in times.items()}
    return {
        "shape": f"{CHAIN} chained [1, {K}] x [{K}, {N}] products, block {BLOCK}, accuracy_level 4, 2 threads",
        "float_zero_points_max_relative_error": relative_error,
        "ms_per_chain_median": medians,
        "float_over_uint8": round(medians["float zero points"] / medians["uint8 zero points"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = {"1 GB (memory)": 1024, "116 MB (onnx-int4)": 116, "158 MB (onnx-int8)": 158}
    reads = {name: {kind: read_gb_s(mb, kind) for kind in ("sum", "max")} for name, mb in sizes.items()}
    print_and_save(
        {"device": device_record(), "read_gb_s_two_threads": reads, "matmul_nbits": zero_point_facts(), "how": __doc__},
        args.out,
    )


if __name__ == "__main__":
    main()
