"""onnxruntime-genai (`og.Model(folder)`, its Generator and Tokenizer) on edgelm's ONNX decoders.

onnxruntime-genai loads a folder: `genai_config.json` naming the model file (which must lie in
that folder: it refuses `..`), the graph's input and output names, the stop tokens and the
search defaults, plus the HF tokenizer files. edgelm's graph keeps its own names
(`input_ids`, `attention_mask`, `past_key_<i>`/`past_value_<i>` → `logits`,
`present_key_<i>`/...) and declares them in the config. Its attention is onnxruntime's
GroupQueryAttention (exporters/onnx_gqa.py), the layout of the runtime's own model builder, so
the config sets `past_present_share_buffer: true`: the runtime allocates each layer's cache
once at max_length and the node writes the new positions into it, instead of a fresh present
per step. Positions follow from the attention mask. `type: "llama"` selects
onnxruntime-genai's plain decoder-only state machine: edgelm's graph carries each
architecture's own details (Gemma3 norms, sliding windows, partial rotary), so the runtime
needs no architecture-specific handling.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelm.vendors import GenerationFacts, TokenClock, VendorRun

CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def genai_config(model_file: str, facts: GenerationFacts) -> dict[str, Any]:
    shape = facts.shape
    eos = list(facts.eos_ids)
    return {
        "model": {
            "type": "llama",
            "bos_token_id": facts.bos_id if facts.bos_id is not None else (eos[0] if eos else 0),
            "eos_token_id": eos,
            "pad_token_id": facts.pad_id if facts.pad_id is not None else (eos[0] if eos else 0),
            "vocab_size": facts.vocab_size,
            "context_length": facts.max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": shape["head_dim"],
                "hidden_size": shape["hidden_size"],
                "num_attention_heads": shape["num_heads"],
                "num_hidden_layers": shape["num_layers"],
                "num_key_value_heads": shape["num_kv_heads"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_%d",
                    "past_value_names": "past_value_%d",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present_key_%d",
                    "present_value_names": "present_value_%d",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": facts.max_context,
            "min_length": 0,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def open_model(folder: Path, threads: int | None) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}
                    }
                }
            )
        )
    return og.Model(config)


class OnnxRuntimeGenAI:
    name = "onnxruntime-genai Generator"
    package = "onnxruntime-genai"
    import_names = ("onnxruntime_genai",)
    text_per_token = False  # compared by token ids anyway

    def prepare(self, artifact: Path, bundle_dir: Path, facts: GenerationFacts) -> list[Path]:
        """genai_config.json and copies of the tokenizer files beside the model file."""
        folder = artifact.parent
        written = []
        for name in TOKENIZER_FILES:
            shutil.copyfile(facts.tokenizer_dir / name, folder / name)
            written.append(folder / name)
        if facts.chat_template:  # the bundle keeps it in chat_template.jinja; genai reads tokenizer_config.json
            config_path = folder / "tokenizer_config.json"
            config_path.write_text(
                json.dumps({**json.loads(config_path.read_text()), "chat_template": facts.chat_template}, indent=1)
            )
        (folder / CONFIG).write_text(json.dumps(genai_config(artifact.name, facts), indent=1))
        return [*written, folder / CONFIG]

    def generate(
        self,
        artifact: Path,
        bundle_dir: Path,
        prompt: str,
        facts: GenerationFacts,
        new_tokens: int,
        threads: int | None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> VendorRun:
        import onnxruntime_genai as og

        start = time.perf_counter()
        model = open_model(artifact.parent, threads)
        tokenizer = og.Tokenizer(model)
        load_s = time.perf_counter() - start
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(ids) + new_tokens,
            do_sample=False,
            **({"min_length": len(ids) + new_tokens} if ignore_eos else {}),
        )
        generator = og.Generator(model, params)
        stream, clock, generated = tokenizer.create_stream(), TokenClock(on_text), []
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in facts.eos_ids and not ignore_eos:
                break
            generated.append(token)
            clock.add(stream.decode(token))
        del generator
        return clock.run(load_s, ids=generated, prompt_ids=[int(i) for i in ids])


VENDOR = OnnxRuntimeGenAI()
