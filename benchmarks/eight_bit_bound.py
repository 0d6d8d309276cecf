"""Where 8-bit loses top-1 agreement on the default model: each kind of 8-bit rounding the
formats apply, simulated alone in torch (edgelm.scaling.QuantProxy), on the parity text.

    python benchmarks/eight_bit_bound.py --out benchmarks/results/eight_bit_bound.json

Rows: weights per output channel (ExecuTorch 8da8w, TFLite) or per block of 32 (ONNX
MatMulNBits, GGUF Q8_0), the output projection (tied embedding) at 8 bits or float, per-token
int8 activations (ExecuTorch's and TFLite's dynamic quantization) with and without
activation-aware scaling. KL and top-1 against the fp32 model on 2,048 parity tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bandwidth_gb_s

from edgelm.calibration import CalibrationSettings, calibration_windows
from edgelm.compress.measure import windows
from edgelm.model import inspect_source, load_reference_model
from edgelm.parity import parity_text
from edgelm.profile import device_record
from edgelm.scaling import QuantProxy, layers_of, scale_for_quantization
from edgelm.tokenizer import Tokenizer


def fake_quantized(model, proxy: QuantProxy, head: bool):
    import torch

    model = copy.deepcopy(model)
    linears = [m for layer in layers_of(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if head:
        model.lm_head.weight = torch.nn.Parameter(
            model.lm_head.weight.detach().clone()
        )  # untie: the lookup stays float
        linears.append(model.lm_head)
    for linear in linears:
        linear.weight.data = proxy.weights(linear.weight.data)
        if proxy.activation_bits:
            linear.register_forward_pre_hook(lambda _m, args: (proxy.activations(args[0]),))
    return model


def compare(reference, model, batches) -> dict:
    import torch

    kl = agree = count = 0
    with torch.inference_mode():
        for batch in batches:
            ref = torch.log_softmax(reference(input_ids=batch).logits[0].double(), -1)
            out = torch.log_softmax(model(input_ids=batch).logits[0].double(), -1)
            kl += float((ref.exp() * (ref - out)).sum())
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            count += ref.shape[0]
    return {"mean_kl": round(kl / count, 5), "top1_agreement": round(agree / count, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eight_bit_bound.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="edgelm-8bit-"))
    model = load_reference_model(inspect_source(None), scratch / "tokenizer")
    tokenizer = Tokenizer(scratch / "tokenizer")
    evaluation = windows(tokenizer.encode(parity_text(), add_special_tokens=False), 512, 2048)
    calibration, _ = calibration_windows(tokenizer, CalibrationSettings())
    per_channel, block32 = QuantProxy(8, 0, True, None), QuantProxy(8, 32, True, None)
    per_token = QuantProxy(8, 0, True, 8)
    smoothed, _ = scale_for_quantization(model, calibration, per_token)
    cases = [
        ("weights per channel, head float", model, per_channel, False),
        ("weights per block of 32, head float", model, block32, False),
        ("weights per channel, head 8-bit", model, per_channel, True),
        ("weights per block of 32, head 8-bit", model, block32, True),
        ("weights per channel + per-token int8 activations", model, per_token, False),
        ("the same, activation-aware scaled (calibrated)", smoothed, per_token, False),
    ]
    rows = []
    for name, source, proxy, head in cases:
        rows.append({"case": name} | compare(model, fake_quantized(source, proxy, head), evaluation))
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "device": device_record() | {"memory_bandwidth_gb_s": bandwidth_gb_s()},
        "tokens": 2048,
        "rows": rows,
        "how": "benchmarks/eight_bit_bound.py (torch simulation of each rounding, default model)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
