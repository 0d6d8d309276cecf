"""One export-friendly decoder graph, shared by the graph formats (ONNX, ExecuTorch, LiteRT).

Three cache layouts, one module. With an explicit cache (ONNX) the step is

    (input_ids[1, n], past_key_0, past_value_0, ...) -> (logits[1, n, vocab], present_key_0, ...)

with `past_*` of shape [1, kv_heads, past_len, head_dim] and `present_*` = past + the n new
positions. With a static cache (ExecuTorch) the cache lives in mutable buffers of a fixed
`max_context` and the step is

    (input_ids[1, n], input_pos[1]) -> logits[1, n, vocab]

writing the n new keys/values at input_pos.. in place, so a decode step moves no cache
across the runtime boundary. With a host cache (LiteRT, which has no mutable state a
signature could update in place) the caller owns fixed-size cache tensors and the step is

    (input_ids[1, n], input_pos[1], cache_key_0[1, kv_heads, max_context, head_dim], ...)
        -> (logits[1, n, vocab], new_key_0[1, kv_heads, n, head_dim], ...)

attending over the cache slots before input_pos plus the n new positions (two score blocks,
one softmax, so the cache is only read, never copied); the caller writes new_* into its
cache at input_pos, which with a runtime that binds host memory is a slice copy. In every
layout positions and the causal mask are computed inside
the graph, and one graph serves prefill (n tokens) and decode (n = 1), free of Python
control flow on data. The wrapper reuses the source model's own modules (projections,
norms, MLP, rotary embedding, so RoPE scaling variants come for free) and writes only the
attention with its cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgelm.errors import UnsupportedError

# model_type -> family. The graph reads each model's variations off its own modules
# (q/k norms, sandwich norms, per-layer-type RoPE, sliding windows, embedding scale, logit
# softcapping), so a family joins by adding a row once its tests match transformers.
GRAPH_DECODERS = {"llama": "Llama", "qwen2": "Qwen2", "gemma3_text": "Gemma3", "phi3": "Phi-3"}


@dataclass(frozen=True)
class DecoderSignature:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int

    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": ["input_ids[1,n] int64", "past_{key,value}_i[1,kv_heads,past_len,head_dim] float32"],
            "outputs": ["logits[1,n,vocab] float32", "present_{key,value}_i[1,kv_heads,past_len+n,head_dim]"],
            "kv_cache": "explicit inputs/outputs, grows by n per call (one graph for prefill and decode)",
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
        }


def decoder_signature(config: Any) -> DecoderSignature:
    heads = config.num_attention_heads
    return DecoderSignature(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
    )


def build_decoder_graph(
    model: Any,
    static_context: int | None = None,
    separate_head: bool = False,
    host_context: int | None = None,
    executorch_ops: bool = False,
) -> Any:
    """Wrap a transformers causal LM as a DecoderGraph; UnsupportedError if its family isn't covered.

    By default explicit cache inputs/outputs; static_context=N: a static cache of N positions
    in mutable buffers, stepped by input_pos; host_context=N: the caller's cache of N
    positions as inputs, the new positions' keys/values as outputs (see the module doc).
    executorch_ops=True (static cache, float32 activations) writes and attends through
    ExecuTorch's llama custom ops (update_cache, custom_sdpa): the cache is stored
    [1, max_context, kv_heads, head_dim], grouped heads are read in place, and causal
    attention stops at the last written position instead of scanning the whole cache. The
    caller imports executorch.extension.llm.custom_ops first.
    separate_head=True keeps the model's own Embedding and output Linear even when they are
    tied, so that module-based quantizers (torchao) see a Linear head to quantize.
    """
    import torch
    from torch import nn

    model_type = model.config.model_type
    if model_type not in GRAPH_DECODERS:
        raise UnsupportedError(
            f"the exportable decoder graph covers {', '.join(GRAPH_DECODERS)}; {model_type!r} is not covered yet"
        )

    class DecoderGraph(nn.Module):
        def __init__(self, causal_lm: Any):
            super().__init__()
            self.signature = decoder_signature(causal_lm.config)
            self.body = causal_lm.model
            self.lm_head = causal_lm.lm_head
            config = causal_lm.config
            self.static = static_context is not None
            self.host = host_context is not None
            self.executorch_ops = executorch_ops
            if self.static:
                shape = (1, self.signature.num_kv_heads, static_context, self.signature.head_dim)
                if executorch_ops:  # the custom ops' sequence-major layout
                    shape = (1, static_context, self.signature.num_kv_heads, self.signature.head_dim)
                dtype = causal_lm.lm_head.weight.dtype  # an fp16 model keeps an fp16 cache
                for i in range(self.signature.num_layers):
                    self.register_buffer(f"cache_key_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
                    self.register_buffer(f"cache_value_{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            # Tied input/output embeddings: keep ONE tensor, stored [hidden, vocab] so the output
            # projection is a plain MatMul (quantizable by graph-level quantizers) and the input
            # lookup a Gather on axis 1; exporting embed + lm_head separately would store the
            # 113 MB table twice. separate_head keeps the modules instead (see the docstring).
            self.tied = not separate_head and causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight
            if self.tied:
                self.embedding_t = nn.Parameter(causal_lm.lm_head.weight.detach().t().contiguous(), requires_grad=False)
            self.num_heads = config.num_attention_heads
            embed_scale = getattr(causal_lm.model.embed_tokens, "scalar_embed_scale", 1.0)
            self.embed_scale = float(embed_scale)
            # per-layer-type RoPE only where the rotary module keeps one table per type (Gemma3)
            per_type = isinstance(getattr(causal_lm.model.rotary_emb, "rope_type", None), dict)
            self.layer_types = list(getattr(config, "layer_types", None) or []) if per_type else []
            self.final_softcap = getattr(config, "final_logit_softcapping", None)
            self.model_window = getattr(config, "sliding_window", None)

        def _attention(
            self, layer: Any, hidden: Any, cos: Any, sin: Any, i: int, past: tuple, positions: Any, mask: Any
        ):
            attn, n, hd = layer.self_attn, hidden.shape[1], self.signature.head_dim
            kv_heads = self.signature.num_kv_heads
            if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, split q | k | v
                qkv = attn.qkv_proj(hidden)
                q_end, k_end = self.num_heads * hd, (self.num_heads + kv_heads) * hd
                q_out, k_out, v_out = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
            else:
                q_out, k_out, v_out = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
            q = q_out.view(1, n, self.num_heads, hd).transpose(1, 2)
            k = k_out.view(1, n, kv_heads, hd).transpose(1, 2)
            v = v_out.view(1, n, kv_heads, hd).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Gemma3: RMSNorm over each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            if self.static and self.executorch_ops:
                return attn.o_proj(self._executorch_attention(attn, q, k, v, i, mask)), k, v
            if self.host:
                return attn.o_proj(self._host_cache_attention(attn, q, k, v, past[2 * i], past[2 * i + 1], mask)), k, v
            if self.static:  # write the new positions in place; attend over the whole (masked) cache
                cache_k, cache_v = getattr(self, f"cache_key_{i}"), getattr(self, f"cache_value_{i}")
                cache_k.index_copy_(2, positions, k)
                cache_v.index_copy_(2, positions, v)
                k, v = cache_k, cache_v
            else:
                k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
            groups = self.num_heads // self.signature.num_kv_heads
            k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, k_all.transpose(2, 3)) * attn.scaling + mask
            out = torch.matmul(torch.softmax(scores, dim=-1), v_all)
            out = out.transpose(1, 2).reshape(1, n, self.num_heads * hd)
            return attn.o_proj(out), k, v

        def _executorch_attention(self, attn: Any, q: Any, k: Any, v: Any, i: int, mask: Any):
            """update_cache + custom_sdpa on the sequence-major static cache. Causal layers pass
            the start position (the kernel stops there); sliding-window layers pass their
            [n, max_context] additive mask instead."""
            start, n = self.start_pos, q.shape[2]
            cache_k, cache_v = getattr(self, f"cache_key_{i}"), getattr(self, f"cache_value_{i}")
            torch.ops.llama.update_cache(k.transpose(1, 2).contiguous(), cache_k, start)
            torch.ops.llama.update_cache(v.transpose(1, 2).contiguous(), cache_v, start)
            window = getattr(attn, "sliding_window", self.model_window)
            queries = q.transpose(1, 2).contiguous()
            if window is None:
                out = torch.ops.llama.custom_sdpa(queries, cache_k, cache_v, start, None, 0.0, True, attn.scaling)
            else:
                out = torch.ops.llama.custom_sdpa(queries, cache_k, cache_v, 0, mask[0, 0], 0.0, False, attn.scaling)
            return out.reshape(1, n, self.num_heads * self.signature.head_dim)

        def _host_cache_attention(self, attn: Any, q: Any, k: Any, v: Any, cache_k: Any, cache_v: Any, mask: Any):
            """Attention over [cache ; new] without concatenating (copying) the cache. Grouped
            query heads are folded into rows ([1, kv_heads, groups * n, head_dim]) so each
            cached key/value head is read once rather than repeated per query head."""
            n, hd, kv_heads = q.shape[2], self.signature.head_dim, self.signature.num_kv_heads
            groups = self.num_heads // kv_heads
            rows = q.reshape(1, kv_heads, groups * n, hd)
            scores = torch.cat([torch.matmul(rows, cache_k.transpose(2, 3)), torch.matmul(rows, k.transpose(2, 3))], -1)
            probs = torch.softmax(scores * attn.scaling + mask.repeat(1, 1, groups, 1), dim=-1)
            context = cache_k.shape[2]
            out = torch.matmul(probs[..., :context], cache_v) + torch.matmul(probs[..., context:], v)
            return out.reshape(1, self.num_heads, n, hd).transpose(1, 2).reshape(1, n, self.num_heads * hd)

        def forward(self, input_ids: Any, *state: Any):
            n = input_ids.shape[1]
            if self.host:  # state = (input_pos, cache_key_0, cache_value_0, ...)
                start = state[0][0]
                positions = torch.arange(n, dtype=torch.long) + start
                slots = torch.arange(host_context, dtype=torch.long)
                # a slot at or past input_pos holds nothing yet: give it a position no query reaches
                keys = torch.cat([torch.where(slots < start, slots, host_context + n), positions])
                state = state[1:]
            elif self.static:  # state = (input_pos,): where the n new tokens start
                positions = torch.arange(n, dtype=torch.long) + state[0][0]
                keys = torch.arange(static_context, dtype=torch.long)
                if self.executorch_ops:  # the custom ops take the start as an integer
                    self.start_pos = state[0][0].item()
                    torch._check_is_size(self.start_pos)
                    torch._check(self.start_pos + n <= static_context)
            else:  # state = past keys/values
                past_len = state[0].shape[2]
                positions = torch.arange(n, dtype=torch.long) + past_len
                keys = torch.arange(past_len + n, dtype=torch.long)
            if self.tied:
                hidden = self.embedding_t.index_select(1, input_ids.reshape(-1)).t()[None] * self.embed_scale
            else:
                hidden = self.body.embed_tokens(input_ids)  # applies its own scale where it has one
            # RoPE tables per layer type (Gemma3: local and global layers use different bases)
            rope = {t: self.body.rotary_emb(hidden, positions[None], t) for t in dict.fromkeys(self.layer_types)}
            default_rope = None if self.layer_types else self.body.rotary_emb(hidden, positions[None])
            causal = keys[None, :] <= positions[:, None]
            masks: dict[Any, Any] = {}
            presents = []
            for i, layer in enumerate(self.body.layers):
                # per layer where the attention module says (Gemma3, Qwen2); else model-wide (Phi-3)
                window = getattr(layer.self_attn, "sliding_window", self.model_window)
                if window not in masks:
                    allowed = causal if window is None else causal & (positions[:, None] - keys[None, :] < window)
                    masks[window] = torch.where(allowed, 0.0, float("-inf")).to(hidden.dtype)[None, None]
                cos, sin = rope[self.layer_types[i]] if self.layer_types else default_rope
                residual = hidden
                attn_out, k, v = self._attention(
                    layer, layer.input_layernorm(hidden), cos, sin, i, state, positions, masks[window]
                )
                if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma3's sandwich norms
                    hidden = residual + layer.post_attention_layernorm(attn_out)
                    hidden = hidden + layer.post_feedforward_layernorm(
                        layer.mlp(layer.pre_feedforward_layernorm(hidden))
                    )
                else:
                    hidden = residual + attn_out
                    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                presents += [k, v]
            normed = self.body.norm(hidden)
            logits = torch.matmul(normed, self.embedding_t) if self.tied else self.lm_head(normed)
            if self.final_softcap:
                logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
            return logits if self.static else (logits, *presents)  # host layout: presents are the new slices

    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        # Partial rotary (Phi-3's partial_rotary_factor): only the first cos.shape[-1] dims turn.
        dim = cos.shape[-1]
        x_rot, x_pass = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
        half = dim // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        out = x_rot * cos[:, None] + rotated * sin[:, None]
        return out if x_pass is None else torch.cat([out, x_pass], dim=-1)

    return DecoderGraph(model).eval()


def example_inputs(signature: DecoderSignature, n: int = 3, past_len: int = 2) -> tuple[Any, ...]:
    """Inputs to trace with: n new tokens after past_len cached ones (both kept > 1 so that
    torch.export treats them as dynamic rather than specialising on 0/1)."""
    import torch

    ids = torch.zeros((1, n), dtype=torch.long)
    shape = (1, signature.num_kv_heads, past_len, signature.head_dim)
    return (ids, *[torch.zeros(shape) for _ in range(2 * signature.num_layers)])
