"""Model intake: each source kind is recognised; bad input is refused with a clear error."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from edgelm.errors import InvalidModelError, TokenizerError, UnsupportedError
from edgelm.model import default_model_path, inspect_source

EXPECTED = {
    "llama": ("llama", "text-generation"),
    "qwen2": ("qwen2", "text-generation"),
    "gemma3": ("gemma3_text", "text-generation"),
    "phi3": ("phi3", "text-generation"),
    "bert": ("bert", "feature-extraction"),
    "bert-cls": ("bert", "text-classification"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_hf_folder_intake_detects_architecture_task_and_parameters(tiny_model_factory, kind):
    import torch
    import transformers

    folder = tiny_model_factory(kind)
    source = inspect_source(folder)
    model_type, task = EXPECTED[kind]
    assert source.kind == "hf-folder"
    assert (source.model_type, source.task) == (model_type, task)
    from edgelm.architectures import TASK_MODEL_CLASSES

    model = getattr(transformers, TASK_MODEL_CLASSES[task]).from_pretrained(str(folder), dtype=torch.float32)
    # stored tensors == unique parameters + buffers saved (tied embeddings are stored once)
    stored = {n: t for n, t in model.state_dict().items()}
    assert source.num_parameters <= sum(t.numel() for t in stored.values())
    assert source.num_parameters >= sum(p.numel() for p in model.parameters())
    assert len(source.sha256) == 64


def test_default_model_is_the_bundled_smollm2_gguf():
    source = inspect_source(None)
    assert source.kind == "gguf" and source.model_type == "llama"
    assert 130e6 < source.num_parameters < 140e6
    assert source.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_gguf_source_is_parsed_once_per_load(tmp_path, monkeypatch):
    """transformers reads a GGUF for the config, the weights and the tokenizer: one parse of the
    file and one tensor-name map serve all three (the repeats were 10 s of the default model's 20 s load)."""
    import gguf

    from edgelm.model import load_reference_model

    parses, maps = [], []
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: parses.append(args) or reader(*args, **kwargs))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *args: maps.append(args) or name_map(*args))
    model = load_reference_model(inspect_source(None), tmp_path / "tokenizer")
    assert len(parses) == 1 and len(maps) == 1
    assert model.config.num_hidden_layers == 30 and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert gguf.GGUFReader is not reader  # still the test's own counter: the loading put back what it found


def test_unknown_architecture_names_the_supported_ones(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba_xl"}))
    with pytest.raises(UnsupportedError, match="llama.*qwen2"):
        inspect_source(folder)


def test_missing_tokenizer_is_a_tokenizer_error(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer"):
        inspect_source(folder)


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InvalidModelError, match="pickle.*--allow-pickle"):
        inspect_source(folder)
    assert inspect_source(folder, allow_pickle=True).weight_files == ["pytorch_model.bin"]
    with pytest.raises(InvalidModelError, match="pickle"):
        inspect_source(folder / "pytorch_model.bin")


def test_truncated_safetensors_is_invalid(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InvalidModelError, match="truncated"):
        inspect_source(folder)


def test_garbage_config_is_invalid(tiny_llama, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="not valid JSON"):
        inspect_source(folder)


def test_garbage_gguf_is_invalid(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InvalidModelError, match="not a GGUF file"):
        inspect_source(path)


def test_truncated_gguf_is_invalid(tmp_path):
    path = tmp_path / "model.gguf"
    with open(default_model_path(), "rb") as fh:
        path.write_bytes(fh.read(5_000_000))  # header intact, tensor data cut
    with pytest.raises(InvalidModelError, match="truncated|file ends"):
        inspect_source(path)


@pytest.mark.parametrize("field", ["tensor count", "metadata count"])
def test_gguf_counts_near_2_pow_63_are_rejected_without_allocating(tmp_path, field):
    huge = 2**63 - 1
    counts = (huge, 0) if field == "tensor count" else (0, huge)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, *counts) + b"\x00" * 64)
    with pytest.raises(InvalidModelError, match=f"{field} .* cannot fit"):
        inspect_source(path)


def test_gguf_string_length_near_2_pow_63_is_rejected(tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + b"\x00" * 64)
    with pytest.raises(InvalidModelError, match="string length"):
        inspect_source(path)


def test_missing_path_is_invalid(tmp_path):
    with pytest.raises(InvalidModelError, match="no such file"):
        inspect_source(tmp_path / "nope")
