"""LiteRT-LM (`litert_lm.Engine`, the engine behind Android's litertlm-android) on edgelm's TFLite decoders.

LiteRT-LM loads one `.litertlm` file with sections for the LlmMetadata proto (start and stop
tokens, the token budget, the chat template, the cache's initial value), the prefill/decode
TFLite model and the tokenizer (HF tokenizer.json). edgelm's .tflite already has what the
engine's CPU executor looks for (exporters/tflite.py: `prefill`/`decode` signatures, `tokens`,
`input_pos`, `kv_cache_k_<i>`/`kv_cache_v_<i>` in and out, `logits`), so `prepare` packs that
very file, unchanged, with litert-lm-builder into `<artifact>.litertlm` beside it.

The engine holds back a prompt's last token and feeds it to the first decode step, pads a
prefill chunk with token 0 at position 0 (the graph writes from input_pos[0] on, so that lands
past the real positions, masked) and computes in float32 when asked (`activation_data_type`;
its default for text decoders is float16; the file records float32 as its preference).
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgelm.native_log import quiet_native_streams
from edgelm.vendors import GenerationFacts, TokenClock, VendorRun

LOG_VARIABLE = "EDGELM_LITERT_LOG"
SUFFIX = ".litertlm"


# LiteRT-LM's conversation hands a template each message's content as a list of parts
# ([{"type": "text", "text": ...}]); Hugging Face templates expect a string
CONTENT = re.compile(r"message\[['\"]content['\"]\]|message\.content")
CONTENT_TEXT = (
    "(message['content'] if message['content'] is string else message['content'] | map(attribute='text') | join(''))"
)


def chat_template(hf_template: str) -> str:
    """The model's own chat template, reading a message's content as a string or as LiteRT-LM's
    list of text parts (otherwise `'...' + message['content']` fails in the engine)."""
    return CONTENT.sub(lambda _: CONTENT_TEXT, hf_template)


def llm_metadata(facts: GenerationFacts) -> bytes:
    """The LlmMetadata proto: a start token only where the tokenizer puts one in front of a text
    (the engine adds it itself), every stop token, the token budget of the cache, a zeroed cache."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    metadata = llm_metadata_pb2.LlmMetadata()
    if facts.bos_id is not None:
        metadata.start_token.token_ids.ids.append(facts.bos_id)
    for eos in facts.eos_ids:
        metadata.stop_tokens.add().token_ids.ids.append(eos)
    metadata.max_num_tokens = facts.max_context
    metadata.kv_cache_init_value = 0
    metadata.llm_model_type.generic_model.SetInParent()
    if facts.chat_template:
        metadata.jinja_prompt_template = chat_template(facts.chat_template)
    return metadata.SerializeToString()


def pack(artifact: Path, facts: GenerationFacts, out: Path) -> Path:
    """`out`, a .litertlm holding `artifact` as its prefill/decode model, the bundle's tokenizer
    and the metadata above."""
    from litert_lm_builder.litertlm_builder import LitertLmFileBuilder, TfLiteModelType

    with tempfile.TemporaryDirectory(prefix="edgelm-litertlm-") as scratch:
        metadata_path = Path(scratch) / "llm_metadata.pb"
        metadata_path.write_bytes(llm_metadata(facts))
        builder = (
            LitertLmFileBuilder()
            .add_llm_metadata(str(metadata_path))
            .add_tflite_model(str(artifact), TfLiteModelType.PREFILL_DECODE, prefer_activation_type="fp32")
            .add_hf_tokenizer(str(facts.tokenizer_dir / "tokenizer.json"))
        )
        with out.open("wb") as stream, contextlib.redirect_stdout(io.StringIO()):  # it prints each option it adds
            builder.build(stream)
    return out


def packed_path(artifact: Path) -> Path:
    return artifact.with_suffix(SUFFIX)


class LiteRtLm:
    name = "LiteRT-LM Engine"
    package = "litert-lm-api"
    import_names = ("litert_lm", "litert_lm_builder")
    text_per_token = False

    def prepare(self, artifact: Path, bundle_dir: Path, facts: GenerationFacts) -> list[Path]:
        """The .litertlm beside the .tflite (the file an app ships to LiteRT-LM)."""
        return [pack(artifact, facts, packed_path(artifact))]

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
        import litert_lm
        from litert_lm import interfaces
        from litert_lm._ffi import ActivationDataType

        del ignore_eos  # the engine stops at the metadata's stop tokens; tokens are counted instead
        with tempfile.TemporaryDirectory(prefix="edgelm-litertlm-") as scratch:
            path = packed_path(artifact)
            if not path.is_file():  # a bundle written before edgelm put the .litertlm beside the .tflite
                path = pack(artifact, facts, Path(scratch) / path.name)
            with quiet_native_streams(LOG_VARIABLE, (2,)):
                start = time.perf_counter()
                engine = litert_lm.Engine(
                    str(path),
                    backend=interfaces.CPU(thread_count=threads) if threads else interfaces.CPU(),
                    max_num_tokens=facts.max_context,
                    cache_dir=":nocache",
                    activation_data_type=ActivationDataType.FLOAT32,
                )
                session = engine.create_session(
                    apply_prompt_template=False,
                    sampler_config=interfaces.SamplerConfig(top_k=1),
                    max_output_tokens=new_tokens,
                )
                load_s = time.perf_counter() - start
                prompt_ids = ([facts.bos_id] if facts.bos_id is not None else []) + engine.tokenize(prompt)
                clock = TokenClock(on_text)
                session.run_prefill([prompt])
                for response in session.run_decode_async():
                    for piece in response.texts:
                        clock.add(piece)
                session.close()
                engine.close()
        return clock.run(load_s, prompt_ids=prompt_ids)


VENDOR = LiteRtLm()
