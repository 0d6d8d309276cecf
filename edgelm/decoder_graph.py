"""The decoder graph of edgelm.graph as torch modules: `DecoderGraph` steps the source model's
own modules, and one `CacheLayout` object per layout owns what differs between formats — the
state a step takes, the positions of the new tokens and of the keys they see, how a layer's
keys and values are stored and attended over, and what the step returns:

    GroupQueryCache     ONNX: past in, past + new out, through onnxruntime's GroupQueryAttention
    StaticCache         ExecuTorch: mutable buffers, input_pos, logits out
    ExecuTorchOpsCache  the same through ExecuTorch's llama custom ops (update_cache, custom_sdpa)
    InPlaceCache        LiteRT (LiteRT-LM's convention): the whole cache in, the whole cache out
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgelm.graph import DecoderSignature, decoder_signature


def masked_attention(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """Plain attention of q [1, heads, n, d] over k, v [1, kv_heads, total, d] (key/value heads
    repeated for grouped queries) under an additive mask; [1, n, heads * d]."""
    groups = q.shape[1] // k.shape[1]
    k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k_all.transpose(2, 3)) * scale + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v_all)
    return out.transpose(1, 2).reshape(1, q.shape[2], q.shape[1] * q.shape[3])


@torch.library.custom_op("edgelm::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
    window: int,
    cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [1, n, heads * d], key/value [1, n, kv_heads * d], past [1, kv_heads, p, d] →
    (attention output [1, n, heads * d], present key, present value [1, kv_heads, p + n, d]);
    causal, and within `window` positions where window > 0. With cos/sin tables [positions, d / 2]
    the new queries and keys are rotated first (RoPE, rotate-half layout), as the ONNX node's
    do_rotary does."""
    n, head_dim = query.shape[1], past_key.shape[3]
    queries = query.view(1, n, num_heads, head_dim).transpose(1, 2)
    new_keys = key.view(1, n, kv_heads, head_dim).transpose(1, 2)
    total = past_key.shape[2] + n
    positions = torch.arange(n) + total - n
    if cos_cache is not None and sin_cache is not None:
        cos, sin = (torch.cat([table[positions]] * 2, -1)[None] for table in (cos_cache, sin_cache))
        cos, sin = rope_tables(cos, sin)
        queries, new_keys = rotate(queries, cos, sin), rotate(new_keys, cos, sin)
    keys = torch.cat([past_key, new_keys], 2)
    values = torch.cat([past_value, value.view(1, n, kv_heads, head_dim).transpose(1, 2)], 2)
    slots = torch.arange(total)
    allowed = slots[None] <= positions[:, None]
    if window > 0:
        allowed = allowed & (positions[:, None] - slots[None] < window)
    out = masked_attention(queries, keys, values, scale, torch.where(allowed, 0.0, float("-inf")))
    return out, keys, values


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, num_heads, kv_heads, scale, window, *tables):
    shape = (1, kv_heads, past_key.shape[2] + query.shape[1], past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


class CacheLayout:
    """Where one graph's keys and values live between calls. A layout owns what differs between
    the formats: the state the step takes, the positions of the new tokens and of every key the
    queries see, how a layer's new keys/values are stored and attended over, and what the step
    returns. The graph itself (projections, RoPE, norms, MLP) is the same for all of them, except
    that a layout whose attention op applies RoPE itself gets q and k unrotated."""

    rotates_inside = False

    def begin(self, n: int, state: tuple) -> tuple[Any, Any, tuple]:
        """(positions of the n new tokens, positions of every key attended over, the per-layer state)."""
        raise NotImplementedError

    def attend(self, graph: DecoderGraph, attn: Any, q: Any, k: Any, v: Any, i: int, state: tuple, mask: Any) -> Any:
        """Layer i's attention output [1, n, heads * head_dim] over its cache and the new k, v."""
        raise NotImplementedError

    def outputs(self, logits: Any, presents: list[Any]) -> Any:
        return (logits, *presents)


class GroupQueryCache(CacheLayout):
    """ONNX: input_ids, attention_mask [1, past + n], each layer's past; attention through
    onnxruntime's GroupQueryAttention (torch.ops.edgelm.group_query_attention below; the ONNX
    translation is exporters/onnx_gqa.py), whose presents are past + new, or, in
    onnxruntime-genai with a buffer shared between past and present, that buffer updated in place.
    Positions follow from the mask's width, so they are right in both cases."""

    def __init__(self) -> None:
        self.mask: Any = None
        self.rotates_inside = False

    def register(self, graph: DecoderGraph) -> None:
        """RoPE tables for every position of the context, one pair per layer type, as graph
        buffers (initializers in the file): the node's do_rotary then turns q and k itself,
        ~12 fewer nodes per layer and step than RoPE spelled out in the graph. Only where the
        model's RoPE is the full-width rotate-half kind the node implements, on heads of a
        multiple of 16 dimensions (onnxruntime's kernel refuses others); else RoPE stays in the graph."""
        head_dim = graph.signature.head_dim
        if head_dim % 16:
            return
        positions = torch.arange(graph.signature.max_context)[None]
        probe = torch.zeros(1, 1, head_dim, dtype=graph.lm_head.weight.dtype)
        tables = {}
        for layer_type in dict.fromkeys(graph.layer_types) if graph.layer_types else [None]:
            args = (probe, positions) if layer_type is None else (probe, positions, layer_type)
            cos, sin = (t[0] for t in graph.body.rotary_emb(*args))
            half = head_dim // 2
            full_width = cos.shape[-1] == head_dim and torch.equal(cos[:, :half], cos[:, half:])
            if not full_width or not torch.equal(sin[:, :half], sin[:, half:]):
                return
            tables[layer_type] = (cos[:, :half].contiguous(), sin[:, :half].contiguous())
        for index, (cos, sin) in enumerate(tables.values()):
            graph.register_buffer(f"rope_cos_{index}", cos, persistent=False)
            graph.register_buffer(f"rope_sin_{index}", sin, persistent=False)
        self.table_index = {layer_type: index for index, layer_type in enumerate(tables)}
        self.rotates_inside = True

    def begin(self, n: int, state: tuple) -> tuple[Any, Any, tuple]:
        self.mask = state[0]
        total = self.mask.shape[1]
        return torch.arange(n, dtype=torch.long) + total - n, torch.arange(total, dtype=torch.long), state[1:]

    def attend(self, graph: DecoderGraph, attn: Any, q: Any, k: Any, v: Any, i: int, state: tuple, mask: Any) -> Any:
        n, hd, kv_heads = q.shape[2], graph.signature.head_dim, graph.signature.num_kv_heads
        window = getattr(attn, "sliding_window", graph.model_window) or 0
        tables: tuple[Any, Any] = (None, None)
        if self.rotates_inside:
            index = self.table_index[graph.layer_types[i] if graph.layer_types else None]
            tables = (getattr(graph, f"rope_cos_{index}"), getattr(graph, f"rope_sin_{index}"))
        return torch.ops.edgelm.group_query_attention(
            q.transpose(1, 2).reshape(1, n, graph.num_heads * hd),
            k.transpose(1, 2).reshape(1, n, kv_heads * hd),
            v.transpose(1, 2).reshape(1, n, kv_heads * hd),
            state[2 * i],
            state[2 * i + 1],
            self.mask,
            graph.num_heads,
            kv_heads,
            float(attn.scaling),
            int(window),
            *tables,
        )


class StaticCache(CacheLayout):
    """ExecuTorch: the cache lives in the graph's mutable buffers of `context` positions; the
    step takes input_pos, writes the new positions in place and returns only the logits."""

    def __init__(self, context: int) -> None:
        self.context = context
        self.positions: Any = None

    def shape(self, signature: DecoderSignature) -> tuple[int, ...]:
        return (1, signature.num_kv_heads, self.context, signature.head_dim)

    def register(self, graph: Any, dtype: Any) -> None:
        """One key and one value buffer per layer on `graph` (an fp16 model keeps an fp16 cache)."""
        for i in range(graph.signature.num_layers):
            for kind in ("key", "value"):
                graph.register_buffer(
                    f"cache_{kind}_{i}", torch.zeros(self.shape(graph.signature), dtype=dtype), persistent=False
                )

    def begin(self, n: int, state: tuple) -> tuple[Any, Any, tuple]:
        self.positions = torch.arange(n, dtype=torch.long) + state[0][0]
        return self.positions, torch.arange(self.context, dtype=torch.long), ()

    def attend(self, graph: DecoderGraph, attn: Any, q: Any, k: Any, v: Any, i: int, state: tuple, mask: Any) -> Any:
        cache_k, cache_v = getattr(graph, f"cache_key_{i}"), getattr(graph, f"cache_value_{i}")
        cache_k.index_copy_(2, self.positions, k)
        cache_v.index_copy_(2, self.positions, v)
        return masked_attention(q, cache_k, cache_v, attn.scaling, mask), cache_k, cache_v

    def outputs(self, logits: Any, presents: list[Any]) -> Any:
        return logits


class ExecuTorchOpsCache(StaticCache):
    """The static cache written and attended through ExecuTorch's llama custom ops
    (update_cache, custom_sdpa): stored [1, context, kv_heads, head_dim], grouped heads read in
    place, causal attention stopping at the last written position. The caller imports
    executorch.extension.llm.custom_ops first."""

    def __init__(self, context: int) -> None:
        super().__init__(context)
        self.start: Any = None

    def shape(self, signature: DecoderSignature) -> tuple[int, ...]:
        return (1, self.context, signature.num_kv_heads, signature.head_dim)

    def begin(self, n: int, state: tuple) -> tuple[Any, Any, tuple]:
        positions, keys, rest = super().begin(n, state)
        self.start = state[0][0].item()  # the custom ops take the start as an integer
        torch._check_is_size(self.start)
        torch._check(self.start + n <= self.context)
        return positions, keys, rest

    def attend(self, graph: DecoderGraph, attn: Any, q: Any, k: Any, v: Any, i: int, state: tuple, mask: Any) -> Any:
        """Causal layers pass the start position (the kernel stops there); sliding-window layers
        pass their [n, context] additive mask instead."""
        n = q.shape[2]
        cache_k, cache_v = getattr(graph, f"cache_key_{i}"), getattr(graph, f"cache_value_{i}")
        torch.ops.llama.update_cache(k.transpose(1, 2).contiguous(), cache_k, self.start)
        torch.ops.llama.update_cache(v.transpose(1, 2).contiguous(), cache_v, self.start)
        queries = q.transpose(1, 2).contiguous()
        if getattr(attn, "sliding_window", graph.model_window) is None:
            out = torch.ops.llama.custom_sdpa(queries, cache_k, cache_v, self.start, None, 0.0, True, attn.scaling)
        else:
            out = torch.ops.llama.custom_sdpa(queries, cache_k, cache_v, 0, mask[0, 0], 0.0, False, attn.scaling)
        return out.reshape(1, n, graph.num_heads * graph.signature.head_dim), cache_k, cache_v


class InPlaceCache(CacheLayout):
    """LiteRT, in LiteRT-LM's convention: every layer's whole cache of `context` positions comes
    in (`kv_cache_k_<i>`, `kv_cache_v_<i>`) and goes out updated under the same name, so a
    runtime that binds each output to its input's buffer (LiteRT-LM's CPU executor, edgelm's
    session) writes only the new positions. `input_pos` holds each new token's position; the
    new keys/values land at input_pos[0] onward (a dynamic-update-slice: a prompt chunk's
    padding, after the real tokens, lands past them where the causal mask hides it until a
    later token overwrites it). Slot s of the cache is position s, so the mask is slot <= position.

    Keys are stored [1, kv_heads, context, head_dim] (LiteRT-LM reads the context length there),
    values transposed, [1, kv_heads, head_dim, context], as litert-torch's generative models
    store them with transpose_kv_cache and LiteRT-LM runs them: both products of attention then
    contract the two operands' last dimensions, one BATCH_MATMUL each that reads the cache as it
    lies. With values [context, head_dim] the second product's kernel re-laid out every layer's
    whole value cache at every step, and with q · kᵀ spelled matmul(q, k.transpose(2, 3)) the
    converter kept a TRANSPOSE of the whole key cache per layer and step. With these two and the
    fused projections (exporters/tflite.py), the default model's int8 went from 0.86x litert-torch's
    in LiteRT-LM to level with it (benchmarks/results/peers.json at 100c0c4 and from ef06934 on)."""

    def __init__(self, context: int) -> None:
        from litert_torch.generative.custom_ops.bmm_4d import bmm_4d
        from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

        self.context = context
        self.update = dynamic_update_slice  # converts to TFLite's DYNAMIC_UPDATE_SLICE
        self.contract_last = bmm_4d  # a · bᵀ over [1, heads, rows, d] × [1, heads, columns, d]
        self.key_start: Any = None
        self.value_start: Any = None

    @staticmethod
    def cache_shapes(kv_heads: int, context: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Each layer's key ("k") and value ("v") cache shape."""
        return {"k": (1, kv_heads, context, head_dim), "v": (1, kv_heads, head_dim, context)}

    def begin(self, n: int, state: tuple) -> tuple[Any, Any, tuple]:
        input_pos = state[0]
        zero, position = torch.zeros([], dtype=torch.int32), input_pos.int()[0].reshape([])
        self.key_start, self.value_start = [zero, zero, position, zero], [zero, zero, zero, position]
        return input_pos.long(), torch.arange(self.context, dtype=torch.long), state[1:]

    def attend(self, graph: DecoderGraph, attn: Any, q: Any, k: Any, v: Any, i: int, state: tuple, mask: Any) -> Any:
        """Grouped query heads are folded into rows ([1, kv_heads, groups * n, head_dim]) so each
        cached key/value head is read once rather than repeated per query head."""
        cache_k = self.update(state[2 * i], k.to(state[2 * i].dtype), self.key_start)
        cache_v = self.update(state[2 * i + 1], v.transpose(2, 3).to(state[2 * i + 1].dtype), self.value_start)
        n, hd, kv_heads = q.shape[2], graph.signature.head_dim, graph.signature.num_kv_heads
        groups = graph.num_heads // kv_heads
        rows = q.reshape(1, kv_heads, groups * n, hd) * attn.scaling  # scaled before: fewer elements than the scores
        scores = self.contract_last(rows, cache_k) + mask.repeat(1, 1, groups, 1)
        out = self.contract_last(torch.softmax(scores, dim=-1), cache_v)
        return (
            out.reshape(1, graph.num_heads, n, hd).transpose(1, 2).reshape(1, n, graph.num_heads * hd),
            cache_k,
            cache_v,
        )


def signed_sin(sin: Any) -> Any:
    """The sin table with rotate-half's minus sign folded in: rotate-half pairs x1 with -x2, so
    cat(-x2, x1) * sin = cat(x2, x1) * cat(-sin1, sin2) — one negation per step instead of one per
    rotated tensor and layer."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: Any, cos: Any, sin_signed: Any) -> Any:
    """RoPE of x [1, heads, n, d] with tables [1, 1, n, rotary dims] (sin from signed_sin). Partial
    rotary (Phi-3's partial_rotary_factor): only the first rotary dims turn."""
    dim = cos.shape[-1]
    x_rot, x_pass = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    half = dim // 2
    swapped = torch.cat([x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + swapped * sin_signed
    return out if x_pass is None else torch.cat([out, x_pass], dim=-1)


def rope_tables(cos: Any, sin: Any) -> tuple[Any, Any]:
    """(cos, signed sin) [1, 1, n, rotary dims] from a rotary module's [1, n, rotary dims]: made
    once per step and shared by every layer, so no layer repeats the reshape or the sign."""
    return cos[:, None], signed_sin(sin)[:, None]


class DecoderGraph(nn.Module):
    """The source model's own modules stepped with one cache layout (see the module doc)."""

    def __init__(self, causal_lm: Any, cache: CacheLayout, separate_head: bool = False) -> None:
        super().__init__()
        config = causal_lm.config
        self.signature = decoder_signature(config)
        self.body = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.cache = cache
        if isinstance(cache, StaticCache):
            cache.register(self, causal_lm.lm_head.weight.dtype)
        # Tied input/output embeddings: keep ONE tensor, stored [hidden, vocab] so the output
        # projection is a plain MatMul (quantizable by graph-level quantizers) and the input
        # lookup a Gather on axis 1; exporting embed + lm_head separately would store the
        # 113 MB table twice. separate_head keeps the modules instead (module-based quantizers
        # such as torchao then see a Linear head to quantize).
        self.tied = not separate_head and causal_lm.lm_head.weight is causal_lm.model.embed_tokens.weight
        if self.tied:
            self.embedding_t = nn.Parameter(causal_lm.lm_head.weight.detach().t().contiguous(), requires_grad=False)
        self.num_heads = config.num_attention_heads
        self.embed_scale = float(getattr(causal_lm.model.embed_tokens, "scalar_embed_scale", 1.0))
        # per-layer-type RoPE only where the rotary module keeps one table per type (Gemma3)
        per_type = isinstance(getattr(causal_lm.model.rotary_emb, "rope_type", None), dict)
        self.layer_types = list(getattr(config, "layer_types", None) or []) if per_type else []
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.model_window = getattr(config, "sliding_window", None)
        if isinstance(cache, GroupQueryCache):
            cache.register(self)

    def _project(self, attn: Any, hidden: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """q, k, v [1, heads, n, head_dim] of one layer, normed per head where the model does and rotated.
        A fused q|k|v projection (Phi-3's own, or edgelm.fusion's) is rotated as one q|k block: one
        RoPE per layer instead of two, seven fewer ops per layer in a LiteRT or ExecuTorch graph."""
        n, hd, kv_heads = hidden.shape[1], self.signature.head_dim, self.signature.num_kv_heads
        heads = self.num_heads
        if hasattr(attn, "qkv_proj"):  # one fused projection, split q | k | v
            qkv = attn.qkv_proj(hidden).view(1, n, heads + 2 * kv_heads, hd).transpose(1, 2)
            if not hasattr(attn, "q_norm") and not self.cache.rotates_inside:
                qk = rotate(qkv[:, : heads + kv_heads], cos, sin)
                return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
        else:
            q = attn.q_proj(hidden).view(1, n, heads, hd).transpose(1, 2)
            k = attn.k_proj(hidden).view(1, n, kv_heads, hd).transpose(1, 2)
            v = attn.v_proj(hidden).view(1, n, kv_heads, hd).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Gemma3: RMSNorm over each head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        if self.cache.rotates_inside:
            return q, k, v
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _embed(self, input_ids: Any) -> Any:
        if self.tied:
            return self.embedding_t.index_select(1, input_ids.reshape(-1)).t()[None] * self.embed_scale
        return self.body.embed_tokens(input_ids)  # applies its own scale where it has one

    def _layer(self, i: int, layer: Any, hidden: Any, rope: tuple[Any, Any], state: tuple, mask: Any):
        attn = layer.self_attn
        q, k, v = self._project(attn, layer.input_layernorm(hidden), *rope)
        out, k, v = self.cache.attend(self, attn, q, k, v, i, state, mask)
        attn_out = attn.o_proj(out)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma3's sandwich norms
            hidden = hidden + layer.post_attention_layernorm(attn_out)
            return hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden))), k, v
        hidden = hidden + attn_out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), k, v

    def forward(self, input_ids: Any, *state: Any):
        positions, keys, state = self.cache.begin(input_ids.shape[1], state)
        hidden = self._embed(input_ids)
        # RoPE tables per layer type (Gemma3: local and global layers use different bases)
        if self.cache.rotates_inside:  # the attention op turns q and k from its own tables
            rope: dict[Any, Any] = dict.fromkeys(self.layer_types, (None, None))
            default_rope: Any = (None, None)
        else:
            types = dict.fromkeys(self.layer_types)
            rope = {t: rope_tables(*self.body.rotary_emb(hidden, positions[None], t)) for t in types}
            default_rope = None if self.layer_types else rope_tables(*self.body.rotary_emb(hidden, positions[None]))
        causal = keys[None, :] <= positions[:, None]
        masks: dict[Any, Any] = {}
        presents = []
        for i, layer in enumerate(self.body.layers):
            # per layer where the attention module says (Gemma3, Qwen2); else model-wide (Phi-3)
            window = getattr(layer.self_attn, "sliding_window", self.model_window)
            if window not in masks:
                allowed = causal if window is None else causal & (positions[:, None] - keys[None, :] < window)
                masks[window] = torch.where(allowed, 0.0, float("-inf")).to(hidden.dtype)[None, None]
            layer_rope = rope[self.layer_types[i]] if self.layer_types else default_rope
            hidden, k, v = self._layer(i, layer, hidden, layer_rope, state, masks[window])
            presents += [k, v]
        normed = self.body.norm(hidden)
        logits = torch.matmul(normed, self.embedding_t) if self.tied else self.lm_head(normed)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return self.cache.outputs(logits, presents)


class LiteRtLmSteps(nn.Module):
    """A DecoderGraph with an InPlaceCache under the tensor names LiteRT-LM's executor looks
    for: inputs `tokens` [1, T], `input_pos` [T], `kv_cache_k_<i>` / `kv_cache_v_<i>`; outputs
    `logits` and the updated caches under the inputs' names (the converter names a signature's
    inputs after its keyword arguments, flattened, and its outputs after a returned dict's keys)."""

    def __init__(self, graph: DecoderGraph) -> None:
        super().__init__()
        self.decoder = graph  # not `graph`: an fx GraphModule's own attribute

    def forward(self, tokens: Any, input_pos: Any, kv_cache: dict[str, Any]) -> dict[str, Any]:
        layers = range(self.decoder.signature.num_layers)
        caches = [kv_cache[f"{kind}_{i}"] for i in layers for kind in ("k", "v")]
        logits, *updated = self.decoder(tokens, input_pos, *caches)
        names = [f"kv_cache_{kind}_{i}" for i in layers for kind in ("k", "v")]
        return {"logits": logits, **dict(zip(names, updated))}
