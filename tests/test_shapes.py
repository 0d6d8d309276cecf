"""The real-shape random models (edgelm.shapes) have the published models' sizes."""

from __future__ import annotations

import pytest

from edgelm.errors import EdgeLMError
from edgelm.shapes import SHAPES, get_shape, write_shape


@pytest.mark.parametrize(
    ("name", "parameters"),
    [("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400), ("gemma-3-1b-like", 999_885_952)],
)
def test_each_shape_has_the_published_models_parameter_count(name, parameters):
    import torch
    import transformers

    shape = SHAPES[name]
    with torch.device("meta"):  # no memory: only the shapes
        model = getattr(transformers, shape.model_class)(shape.build_config(1, 2))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.tie_word_embeddings


def test_unknown_shapes_and_existing_folders_are_refused(tmp_path):
    with pytest.raises(EdgeLMError, match="known: qwen2.5-0.5b"):
        get_shape("qwen-7b")
    (tmp_path / "taken").mkdir()
    with pytest.raises(EdgeLMError, match="already exists"):
        write_shape("qwen2.5-0.5b", tmp_path / "taken", tmp_path)


def test_a_folder_written_by_shapes_is_known_as_random_weights(tiny_llama, tmp_path):
    import json
    import shutil

    from edgelm.model import inspect_source

    assert inspect_source(tiny_llama).random_shape is None
    folder = tmp_path / "shaped"
    shutil.copytree(tiny_llama, folder)
    (folder / "shape.json").write_text(json.dumps({"shape": "qwen2.5-0.5b"}))
    assert inspect_source(folder).random_shape == "qwen2.5-0.5b"
    (folder / "shape.json").write_text("[not an object")
    with pytest.raises(EdgeLMError, match="shape.json"):
        inspect_source(folder)
