"""ExecuTorch: the static-cache decoder graph, .pte export (XNNPACK, torchao recipes), the
ExecuTorch runtime, encoders, and files that are not (whole) programs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fast_export_options

import edgelm
from edgelm.errors import InvalidModelError
from edgelm.export import export_bundle

DECODERS = ["llama", "qwen2", "gemma3", "phi3"]


@pytest.mark.parametrize("kind", DECODERS)
def test_static_cache_graph_matches_transformers_in_prefill_and_decode(tiny_model_factory, kind):
    """The layout ExecuTorch runs: cache in buffers, stepped by input_pos, reused after a reset."""
    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    graph = build_decoder_graph(model, static_context=64)
    ids = torch.randint(0, graph.signature.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        graph(torch.randint(0, 100, (1, 50)), torch.tensor([0]))  # a longer earlier sequence, then "reset" to 0
        first = graph(ids[:, :30], torch.tensor([0]))
        steps = [graph(ids[:, i : i + 1], torch.tensor([i])) for i in range(30, 40)]
    assert (first - reference[:, :30]).abs().max() <= 1e-4
    assert (torch.cat(steps, dim=1) - reference[:, 30:]).abs().max() <= 1e-4


pytest.importorskip("executorch", reason="the executorch extra is not installed")


@pytest.mark.parametrize("kind", DECODERS)
def test_custom_op_graph_matches_transformers_including_sliding_windows(tiny_model_factory, kind):
    """The float32 layout the .pte files use: ExecuTorch's update_cache/custom_sdpa on a
    sequence-major cache (Gemma3 and Phi-3 have sliding-window layers, which take a mask)."""
    import importlib

    import torch
    import transformers

    from edgelm.graph import build_decoder_graph

    importlib.import_module("executorch.extension.llm.custom_ops.custom_ops")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), dtype=torch.float32).eval()
    graph = build_decoder_graph(model, static_context=64, executorch_ops=True)
    ids = torch.randint(0, graph.signature.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        graph(torch.randint(0, 100, (1, 50)), torch.tensor([0]))
        outputs = [graph(ids[:, :30], torch.tensor([0]))] + [
            graph(ids[:, i : i + 1], torch.tensor([i])) for i in range(30, 40)
        ]
    assert (torch.cat(outputs, dim=1) - reference).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def pte_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("executorch") / "bundle"
    export_bundle(
        tiny_llama, out, fast_export_options(formats=("executorch",), quants=("fp32", "fp16", "int8", "int4"))
    )
    return out


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_other_decoders_export_to_pte_and_match_torch(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("executorch",), quants=("fp32",), profile=False),
    )
    entry = manifest.artifact("executorch-fp32")
    assert entry.parity["max_abs_logit_diff_first_window"] <= 1e-4 and entry.parity["greedy_match_tokens"] == 64


def test_llama_recipes_load_pass_their_gates_and_describe_themselves(pte_bundle):
    from edgelm.bundle import read_bundle

    manifest = read_bundle(pte_bundle)
    by_quant = {a.quant: a for a in manifest.artifacts if a.format == "executorch"}
    assert {q: a.path for q, a in by_quant.items()} == {
        "fp32": "executorch/model.pte",
        "fp16": "executorch/model_fp16.pte",
        "int8": "executorch/model_8da8w.pte",
        "int4": "executorch/model_8da4w.pte",
    }
    assert by_quant["fp32"].parity["max_abs_logit_diff_first_window"] <= 1e-4
    for entry in by_quant.values():
        assert entry.parity["passed"], entry.parity
        assert entry.runtime == "executorch" and entry.signature["delegates"] == ["xnnpack"]
        assert entry.profile["decode_tok_s"] > 0
    assert "int4" in by_quant["int4"].signature["quantization"]["weights"]
    assert by_quant["int4"].signature["quantization"]["embedding"] == "int8 per row"
    for quant in ("int8", "int4"):  # fused projections: q|k|v, o, gate|up, down per layer
        assert by_quant[quant].signature["quantization"]["fused_projections"]
    assert by_quant["int4"].signature["quantization"]["block_bias_correction"] == 4 * 2
    assert by_quant["int4"].bytes < by_quant["fp32"].bytes


def test_a_fresh_process_runs_every_recipe(pte_bundle):
    """The runtime registers the kernel libraries the programs use (quantized embedding,
    llama custom ops) itself: nothing from the export process may be needed."""
    import subprocess
    import sys

    script = (
        "import edgelm, sys\n"
        "for name in ('fp32', 'fp16', 'int8', 'int4'):\n"
        "    edgelm.load(sys.argv[1], format='executorch-' + name).generate('The parity', max_new_tokens=3)\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", script, str(pte_bundle)], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_max_context_is_read_from_the_program_and_enforced(pte_bundle):
    session = edgelm.load(pte_bundle, format="executorch-fp32").session()
    assert session.capabilities.max_context == 512  # min(1024, the tiny model's 512 positions), from get_max_context
    session.reset()
    with pytest.raises(InvalidModelError, match="static cache holds 512"):
        session.prefill(np.zeros(513, dtype=np.int64))


def test_decode_matches_prefill_and_text_matches_the_reference(pte_bundle):
    session = edgelm.load(pte_bundle, format="executorch-fp32").session()
    ids = np.array([3, 44, 120, 9, 200, 17], dtype=np.int64)
    session.reset()
    full = session.prefill(ids)
    session.reset()
    session.prefill(ids[:4])
    assert np.abs(session.decode(int(ids[4])) - full[4]).max() < 1e-4
    assert np.abs(session.decode(int(ids[5])) - full[5]).max() < 1e-4
    ref = edgelm.load(pte_bundle, format="reference-fp32").generate("The object", max_new_tokens=16, ignore_eos=True)
    lm = edgelm.load(pte_bundle, format="executorch-fp32")
    assert lm.generate("The object", max_new_tokens=16, ignore_eos=True) == ref
    assert lm.generate("The object", max_new_tokens=16, ignore_eos=True) == ref  # a second run after reset


@pytest.mark.parametrize("kind", ["bert", "bert-cls"])
def test_encoders_export_to_pte_and_match_torch(tiny_model_factory, tmp_path, kind):
    manifest = export_bundle(
        tiny_model_factory(kind),
        tmp_path / kind,
        fast_export_options(formats=("executorch",), quants=("fp32",), profile=False),
    )
    entry = manifest.artifact("executorch-fp32")
    assert entry.parity["max_abs_diff"] <= 1e-4 and entry.parity["passed"]
    encoder = edgelm.load(tmp_path / kind, format="executorch-fp32")
    texts = ["first text", "a second, longer text"]
    reference = edgelm.load(tmp_path / kind, format="reference-fp32")
    if kind == "bert":
        assert np.abs(encoder.embed(texts) - reference.embed(texts)).max() <= 1e-4
    else:
        assert [list(r) for r in encoder.classify(texts)] == [list(r) for r in reference.classify(texts)]


def test_truncated_or_foreign_files_are_invalid_not_a_crash(pte_bundle, tmp_path):
    from edgelm.runtimes.executorch import ADAPTER

    data = (pte_bundle / "executorch" / "model_8da4w.pte").read_bytes()
    cases = {
        "empty": b"",
        "tiny": data[:5],
        "half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "onnx_named_pte": b"\x08\x07" + b"\x00" * 64,
        "random": np.random.default_rng(0).bytes(4096),
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}.pte"
        path.write_bytes(payload)
        with pytest.raises(InvalidModelError):
            ADAPTER.open(path)


def test_inspect_lists_methods_delegates_and_operators(pte_bundle, tmp_path):
    from edgelm.inspect import describe

    title, rows = describe(pte_bundle / "executorch" / "model_8da4w.pte")
    info = dict(rows)
    assert title.startswith("executorch")
    assert {"forward", "get_max_context", "is_encoder"} <= set(info["methods"].split(", "))
    assert "XnnpackBackend" in info["delegates"]
    assert (
        "embedding_byte" in info["operators outside delegates"]
    )  # the int8 token table, looked up by the quantized kernel
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all")
    with pytest.raises(InvalidModelError):
        describe(bad)


def test_block_bias_correction_restores_offsets_that_integer_zero_points_cannot_represent():
    """Weights on a 4-bit grid with a float offset per block (as in a Q4_1 GGUF): symmetric
    round-to-nearest shifts them; centring plus the correction reproduces them."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from edgelm.exporters.executorch import GROUP_SIZE, quantize_with_block_bias

    torch.manual_seed(0)
    out_features, in_features = 64, 4 * GROUP_SIZE
    scale = torch.rand(out_features, in_features // GROUP_SIZE, 1) * 0.02 + 0.01
    # a float minimum per block, below zero with the maximum above it (as in trained weights)
    offset = -scale * (7 + torch.rand(out_features, in_features // GROUP_SIZE, 1))
    levels = torch.randint(0, 16, (out_features, in_features // GROUP_SIZE, GROUP_SIZE)).float()
    levels[..., 0], levels[..., 1] = 0, 15  # a Q4_1 block spans its own minimum and maximum
    weight = (levels * scale + offset).reshape(out_features, in_features)
    x = torch.randn(8, in_features)
    expected = x @ weight.t()

    def error(mapping: MappingType, correct: bool) -> float:
        model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
        model[0].weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP_SIZE), mapping_type=mapping)
        if correct:
            assert quantize_with_block_bias(model, config, [("0", model[0])]) == (1, 0)
        else:
            quantize_(model, config)
        with torch.no_grad():
            return float((model(x) - expected).abs().mean())

    plain = error(MappingType.SYMMETRIC, correct=False)
    corrected = error(MappingType.SYMMETRIC_NO_CLIPPING_ERR, correct=True)
    assert corrected < plain / 20, (plain, corrected)


def test_gptq_codes_in_the_block_bias_recipe_cut_the_output_error_on_correlated_inputs():
    """An off-grid weight and inputs with correlated channels (as activations have): GPTQ's codes
    on a searched grid, written into torchao's int4 tensor with their offsets in the block-bias
    Linear, err less on held-out inputs than round-to-nearest + block bias."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from edgelm.exporters.executorch import GROUP_SIZE, quantize_with_block_bias
    from edgelm.gptq import HessianAccumulator

    torch.manual_seed(0)
    in_features, out_features = 4 * GROUP_SIZE, 64
    weight = torch.randn(out_features, in_features) * 0.02
    mixing = torch.eye(in_features) + 0.4 * torch.randn(in_features, in_features)
    x = torch.randn(4096, in_features) @ mixing
    statistics = HessianAccumulator(in_features)
    statistics.add(x[:2048])
    held_out = x[2048:]

    def quantized(with_gptq: bool) -> tuple[float, tuple[int, int]]:
        model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
        model[0].weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        config = IntxWeightOnlyConfig(
            weight_dtype=torch.int4,
            granularity=PerGroup(GROUP_SIZE),
            mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR,
        )
        names = {id(model[0]): "layer"}
        counts = quantize_with_block_bias(
            model, config, [("0", model[0])], hessians={"layer": statistics} if with_gptq else None, names=names
        )
        if with_gptq:
            assert model[0].linear.weight.qdata.min() >= -8 and model[0].linear.weight.qdata.max() <= 7
        with torch.no_grad():
            return float(((model(held_out) - held_out @ weight.t()) ** 2).mean()), counts

    rtn, rtn_counts = quantized(False)
    gptq, gptq_counts = quantized(True)
    assert rtn_counts == (1, 0) and gptq_counts == (1, 1)
    assert gptq < 0.8 * rtn, (rtn, gptq)


@pytest.mark.parametrize("quant", ["int4", "fp16"])
def test_the_working_copy_shares_the_weights_and_leaves_the_reference_as_it_was(tiny_llama, quant):
    """The exporter quantizes (or casts) a copy of the modules whose tensors are the caller's own
    storage, so a 1B export holds one copy of the weights; the caller's model — the parity
    reference — comes out bit for bit as it went in."""
    import numpy as np
    import torch
    import transformers

    from edgelm.exporters.executorch import _quantize, _working_copy
    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    work = _working_copy(model, quant)
    if quant == "int4":
        shared = [
            np.shares_memory(a.detach().numpy(), b.detach().numpy())
            for a, b in zip(model.parameters(), work.parameters(), strict=True)
        ]
        assert all(shared) and work.model.layers[0].mlp.up_proj is not model.model.layers[0].mlp.up_proj
        graph = build_decoder_graph(work, static_context=32, separate_head=True)
        recipe = _quantize(graph, quant)
        assert recipe["block_bias_correction"] > 0
    else:
        assert all(p.dtype == torch.float16 for p in work.parameters())
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(
    ("delegate", "message"),
    [
        ("bogus", "unknown ExecuTorch delegate"),
        ("mps", "cannot lower to mps"),
        ("vulkan", "runtime has no VulkanBackend"),
    ],
)
def test_a_delegate_this_install_cannot_lower_and_run_is_refused_before_loading_the_model(
    tiny_llama, tmp_path, delegate, message
):
    from edgelm.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=message):
        export_bundle(tiny_llama, tmp_path / "out", fast_export_options(formats=("executorch",), delegate=delegate))
    assert not (tmp_path / "out").exists()


def test_fused_layers_find_the_calibration_statistics_of_the_linears_they_replace(tiny_llama):
    """GPTQ's input statistics are stored by source Linear name; after fusion every 4-bit Linear
    still finds its own (q|k|v under q_proj, gate|up under gate_proj), layer by layer."""
    import torch
    import transformers

    from edgelm.exporters.executorch import _quantize, _working_copy
    from edgelm.gptq import collect_hessians
    from edgelm.graph import build_decoder_graph

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    statistics = collect_hessians(model, [torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(0))])

    class Recorded(dict):
        asked: list[str] = []

        def get(self, key, default=None):
            self.asked.append(key)
            return super().get(key, default)

    hessians = Recorded(statistics)
    work = _working_copy(model, "int4")
    graph = build_decoder_graph(work, static_context=32, separate_head=True)
    names = {id(module): name for name, module in work.named_modules()}
    recipe = _quantize(graph, "int4", hessians, names, fuse=True)
    per_layer = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    expected = [f"model.layers.{i}.{name}" for i in range(2) for name in per_layer]
    assert sorted(hessians.asked) == sorted(expected) and all(name in statistics for name in expected)
    assert recipe["block_bias_correction"] == 8 and recipe["fused_projections"]
    assert hasattr(graph.body.layers[1].self_attn, "qkv_proj")


def test_the_partition_step_sorts_the_graph_once_and_lowers_the_same_program(tiny_llama, tmp_path, monkeypatch):
    """exporters/executorch_partitions: ExecuTorch re-sorts the whole graph after cutting each
    delegate partition out of it; edgelm sorts once after the last cut. The program must run
    the same: the logits of both lowerings agree bit for bit."""
    import executorch.exir.lowered_backend_module as lowered
    import torch
    import torch.fx.passes.tools_common as tools_common
    import transformers
    from executorch.exir.backend import backend_api

    from edgelm.exporters import executorch_partitions
    from edgelm.exporters.executorch import export_pte
    from edgelm.isolation import mark_trusted
    from edgelm.session import get_runtime

    assert executorch_partitions.applies()  # the pinned release: a new one must be checked again
    sorts = {"per cut": 0, "once": 0}

    def counting(key, sort):
        def counted(graph_module):
            sorts[key] += 1
            return sort(graph_module)

        return counted

    monkeypatch.setattr(lowered, "legalize_graph", counting("per cut", lowered.legalize_graph))
    monkeypatch.setattr(tools_common, "legalize_graph", counting("once", tools_common.legalize_graph))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    originals = (backend_api.create_submodule_from_nodes, backend_api._create_partitions_in_graph_module)
    export_pte(model, "int4", tmp_path / "once.pte")
    assert sorts == {"per cut": 0, "once": 1}
    assert (backend_api.create_submodule_from_nodes, backend_api._create_partitions_in_graph_module) == originals
    monkeypatch.setattr(executorch_partitions, "applies", lambda: False)  # ExecuTorch as it comes
    export_pte(model, "int4", tmp_path / "per_cut.pte")
    assert sorts["per cut"] > 1 and sorts["once"] == 1  # one sort per partition

    ids = np.array([1, 5, 9, 2, 7, 3], dtype=np.int64)
    logits = []
    for name in ("once.pte", "per_cut.pte"):
        mark_trusted(tmp_path / name)
        session = get_runtime("executorch").open(tmp_path / name, threads=1)
        logits.append(np.concatenate([np.ravel(session.prefill(ids)), np.ravel(session.decode(4))]))
        session.close()
    assert np.array_equal(logits[0], logits[1])
