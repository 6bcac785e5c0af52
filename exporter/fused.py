"""The fused backbone graph: ONNX Runtime's fused kernels, the tree mask, an in-place KV cache.

Written straight from the Hugging Face weights (no tracing) with ``onnx.helper``: one
node per fused operation, so ONNX Runtime runs a few hundred kernels a step instead of the
several thousand small ops a trace of the eager model gives (SmolLM2-135M: 7,975 nodes
traced, 361 here). Per layer:

    SkipSimplifiedLayerNormalization  residual add + RMSNorm in one kernel
    MatMul [hidden, (q + 2 kv) heads x head_dim]   Q, K, V in one projection (+ bias: Qwen2)
    (Qwen3: SimplifiedLayerNormalization over each head of Q and K)
    GroupQueryAttention               rotary (``do_rotary``, following ``position_ids``),
                                      grouped KV heads, the cache written in place, the
                                      tree mask as ``attention_bias``
    MatMul o_proj
    SkipSimplifiedLayerNormalization
    MatMul [hidden, 2 x intermediate] gate and up in one projection, then Split,
                                      Sigmoid, Mul, Mul (SiLU(gate) * up), MatMul down

This is the ``fused`` flavour of the graph contract (docs/graph_contract.md). Its inputs
mean what they mean in the ``portable`` flavour (:mod:`exporter.step`, traced), plus one:

    input_ids       int64 [batch, new_tokens]
    position_ids    int64 [batch, new_tokens]       cache length + depth in the tree
    tree_mask       bool  [batch, new_tokens, new_tokens]
    cache_lengths   int64 [batch]                   valid entries in each sequence's cache
    num_logits      int64 [1]                       logits for the last this many new tokens
    past_key_values.{i}.key|value  [batch, kv_heads, cache_capacity, head_dim]

and, in the one-sequence float32 graph, an optional ``num_screened`` int64 [1] (default 0) and
``screen_noise`` float [screened rows, vocab] (default zeros [1, 1]) with the outputs
``screen_ids``, ``screen_logits``, ``screen_bound`` after the cache: the lm_head screen of greedy
decoding and coupled sampling (:func:`_screen`);
and its cache is the whole preallocated buffer, head-major (BNSH, GroupQueryAttention's
layout). ``present.{i}.key|value`` is the same buffer: bound to the same memory (the
runtime does this), GroupQueryAttention writes the new tokens' entries at positions
``cache_lengths .. cache_lengths + new_tokens - 1`` in place and copies nothing else. Not
bound so (plain ``session.run``), the past is read as ``cache_lengths`` long and
``present`` is returned as past + new (what validation does).

The tree mask becomes an additive bias inside the graph, once for all layers: a new token
sees every cached entry of its sequence and, among the new tokens, those ``tree_mask``
allows (GroupQueryAttention's own causal mask is implied: a tree's ancestors come first).

Only standard ONNX and ``com.microsoft`` ops that ONNX Runtime's CPU and CUDA providers
implement; TensorRT's parser does not take the ``com.microsoft`` domain, so TensorRT keeps
the portable flavour.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` (sliding window as
GroupQueryAttention's ``local_window_size``), ``Qwen2ForCausalLM`` (Q/K/V bias),
``Qwen3ForCausalLM`` (per-head Q/K RMSNorm), ``Phi3ForCausalLM`` (Q/K/V and gate/up stored
fused; LongRoPE within its short context), with any rotary scaling transformers computes (the
cos/sin tables come from the model's own rotary module). Everything else raises
:class:`FusedGraphError` naming what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import (
    FUSED_CACHE_START,
    SCREEN_CANDIDATES,
    SCREEN_INPUT,
    SCREEN_NOISE,
    SCREEN_OUTPUTS,
    fused_io_names,
)
from runtime.errors import MedusaError

MS_DOMAIN = "com.microsoft"
FUSED_OPSET = 21
# protobuf cannot hold a file past 2 GiB, and the TorchScript exporter stores a transposed
# copy of a tied lm_head: thresholds above this act as this
MAX_EXTERNAL_DATA_THRESHOLD_MB = 1536.0
# the lm_head screen (_screen): int8 blocks of this many weights along the hidden size, and the
# slack its bound allows for float rounding (relative to |x| |w_i|, and absolute)
SCREEN_BLOCK = 32
SCREEN_REL, SCREEN_ABS = 1e-4, 1e-3


def screen_rel(hidden: int) -> float:
    """The bound's relative float slack for rows of ``hidden`` values: ``SCREEN_REL``, or twice a float32
    dot product's worst-case rounding (hidden x 2^-24) where that is larger."""
    return max(SCREEN_REL, 2.0 * hidden * 2.0**-24)


class FusedGraphError(MedusaError):
    """The model has a feature the fused graph does not implement."""


def fused_io(num_layers: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Input names, output names and named dynamic axes of the fused ``model.onnx``.

    As in the portable flavour, ``dynamic_axes[name]`` lists a tensor's dynamic dimensions;
    here the cache tensors' first three dimensions are named (``kv_heads`` is fixed by the
    model): ``past_capacity`` is the bound buffer's length (the runtime binds its whole
    preallocated cache, and the same buffer as ``present``).
    """
    inputs, outputs = fused_io_names(num_layers)
    past, present = inputs[FUSED_CACHE_START:], outputs[2:]
    axes = {
        "input_ids": ["batch", "new_tokens"],
        "position_ids": ["batch", "new_tokens"],
        "tree_mask": ["batch", "new_tokens", "new_tokens"],
        "cache_lengths": ["batch"],
        "num_logits": [],
        **{name: ["batch", "kv_heads", "past_capacity"] for name in past},
        "logits": ["batch", "logits_rows"],
        "hidden_states": ["batch", "new_tokens"],
        **{name: ["batch", "kv_heads", "present_capacity"] for name in present},
    }
    return inputs, outputs, axes


def _np(t, dtype) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().astype(dtype)


def rope_type(config) -> str | None:
    """The config's rotary scaling type (``rope_scaling``: transformers 5 names it ``rope_type``, older files ``type``)."""
    rope = getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type") or rope.get("type")


def longrope_short_context(config) -> int | None:
    """Where a LongRoPE config switches to its long factors (``original_max_position_embeddings``); None for
    other rotary types. A LongRoPE config that does not say raises :class:`FusedGraphError`."""
    if rope_type(config) != "longrope":
        return None
    rope = getattr(config, "rope_scaling", None) or {}
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if original is None:
        raise FusedGraphError(
            "LongRoPE without original_max_position_embeddings: the config does not say where it switches"
        )
    return int(original)


def _check_supported(model) -> None:
    c = model.config
    name = type(model).__name__
    from exporter.models import SUPPORTED_ARCHITECTURES

    if name not in SUPPORTED_ARCHITECTURES:
        raise FusedGraphError(f"{name} has no fused graph; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = getattr(c, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise FusedGraphError(f"hidden_act {act!r}: the fused graph implements SiLU MLPs only (use --graph portable)")
    rope = getattr(c, "rope_scaling", None) or {}
    if rope_type(c) == "dynamic":
        raise FusedGraphError("dynamic NTK rotary scaling changes with the sequence length: use --graph portable")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    partial = getattr(c, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise FusedGraphError(
            f"partial_rotary_factor {partial}: the fused graph rotates whole heads (use --graph portable)"
        )
    if head_dim % 16:
        raise FusedGraphError(
            f"head_dim {head_dim}: ONNX Runtime's GroupQueryAttention needs a multiple of 16 (use --graph portable)"
        )


def _check_longrope(c, max_positions: int) -> None:
    """LongRoPE (Phi-3's 128k configs) rotates by its short factors while a sequence is at most
    ``original_max_position_embeddings`` long and by its long ones past that, switching at each call's
    longest position; the fused graph's tables hold one set, so its context stops where the short set ends."""
    original = longrope_short_context(c)  # (the portable graph cannot trace the switch: exporter.export refuses it)
    if original is not None and max_positions > original:
        raise FusedGraphError(
            f"LongRoPE switches to its long factors past original_max_position_embeddings ({original}), which a "
            f"context of {max_positions} reaches: use --max-context {original} or less"
        )


def _rotary_tables(model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches ``[max_positions, head_dim / 2]`` from the model's own rotary module
    (whatever scaling it applies, attention_scaling included)."""
    import torch

    rot = model.model.rotary_emb
    pos = torch.arange(max_positions, dtype=torch.int64)[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rot(x, pos)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def sliding_window_size(config) -> int:
    """GroupQueryAttention's ``local_window_size`` for this config (-1: none)."""
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", True)
    if window is None or not use:
        return -1
    return int(window)


class _Graph:
    def __init__(self, dtype):
        from onnx import helper

        self.h = helper
        self.nodes = []
        self.inits = []
        self.dtype = dtype
        from onnx import helper as _h

        self.tdt = _h.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.init(name, np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs, outputs=1, domain: str = "", name: str | None = None, **attrs):
        name = name or self.name(op_type)
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(
            self.h.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs


def build_fused_backbone(
    model,
    dtype: str = "float32",
    max_positions: int | None = None,
    batched: bool = False,
    folded: int = 0,
    screen: bool = True,
):
    """The fused ``model.onnx`` of a Llama-family *ForCausalLM, as an ``onnx.ModelProto``.

    ``dtype``: float32 or float16 (weights, activations, cache, logits). ``max_positions``
    sizes the rotary tables (the artifact's max_context; default max_position_embeddings).

    ``batched``: the batch graph (``batch.onnx``, :func:`_batched_attention`) instead: the same
    weights and inputs, attention from standard MatMul/Softmax ops so that several sequences
    with their own cache lengths and trees run in one call, the new tokens' K/V returned alone.

    ``screen``: the one-sequence float32 graph also screens the lm_head in int8 for greedy
    decoding (:func:`_screen`; hidden sizes that are a multiple of ``SCREEN_BLOCK``).

    ``folded`` (>= 1): the folded batch graph (``fold.onnx``, :func:`_folded_attention`) for up
    to ``folded`` sequences a call: the same inputs as ``batch.onnx``, GroupQueryAttention in
    place over the slots' cache as one sequence whose heads are the sequences' heads.
    """
    from onnx import TensorProto

    _check_supported(model)
    c = model.config
    npdt = {"float32": np.float32, "float16": np.float16}[dtype]
    tdt = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    L = c.num_hidden_layers
    H = c.hidden_size
    nq = c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or nq
    D = getattr(c, "head_dim", None) or H // nq
    V = c.vocab_size
    eps = float(c.rms_norm_eps)
    max_positions = int(max_positions or c.max_position_embeddings)
    _check_longrope(c, max_positions)
    window = sliding_window_size(c)
    inputs, outputs, _ = fused_io(L)
    g = _Graph(npdt)
    sd = model.state_dict()
    h = g.h

    # ---- shared inputs derived once: GroupQueryAttention's lengths and the tree bias
    one = g.const("const/one", [1])
    zero = g.const("const/zero", [0])
    shape_ids = g.op("Shape", ["input_ids"], name="shape_ids")
    n_new = g.op("Gather", [shape_ids, one], name="n_new", axis=0)  # [1] int64
    if folded and batched:
        raise FusedGraphError("batched and folded are two different graphs: ask for one")
    if not batched and not folded:
        seqlens = g.op("Sub", [g.op("Add", ["cache_lengths", n_new]), one])  # [B] = cache + new - 1
        seqlens_k = g.op("Cast", [seqlens], name="seqlens_k", to=TensorProto.INT32)
        total = g.op("Add", [g.op("ReduceMax", ["cache_lengths"], keepdims=1), n_new])  # [1]
        total_len = g.op("Cast", [g.op("Squeeze", [total, zero])], name="total_sequence_length", to=TensorProto.INT32)
        # attention_bias [B, 1, new, total]: column j of sequence b is cache entry j (j < cache_b),
        # else new token j - cache_b, visible where tree_mask says so
        cols = g.op(
            "Range", [g.op("Squeeze", [zero, zero]), g.op("Squeeze", [total, zero]), g.op("Squeeze", [one, zero])]
        )
        lens3 = g.op("Unsqueeze", ["cache_lengths", g.const("const/axes12", [1, 2])])  # [B, 1, 1]
        rel = g.op("Sub", [cols, lens3])  # [B, 1, T]
        is_past = g.op("Less", [rel, zero])
        n_minus_1 = g.op("Sub", [n_new, one])
        idx = g.op("Max", [g.op("Min", [rel, n_minus_1]), zero])  # clamp to [0, new-1]
        bnt = g.op("Concat", [g.op("Gather", [shape_ids, zero], axis=0), n_new, total], axis=0)  # [B, new, T]
        idx = g.op("Expand", [idx, bnt])
        in_tree = g.op("GatherElements", ["tree_mask", idx], axis=2)  # [B, new, T]
        in_range = g.op("Less", [rel, n_new])
        visible = g.op("Or", [is_past, g.op("And", [in_tree, in_range])])
        attention_bias = g.op("Unsqueeze", [_additive_bias(g, visible, npdt), one], name="attention_bias")

    if batched:
        if window != -1 and window < max_positions:
            raise FusedGraphError(
                f"sliding window {window} < context {max_positions}: the batch graph has no window (use --max-context)"
            )
        batch_bias = _batch_bias(g, nq // nkv, inputs[FUSED_CACHE_START], npdt, zero, one, n_new)
    if folded:
        if window != -1 and window < max_positions:
            raise FusedGraphError(
                f"sliding window {window} < context {max_positions}: the folded graph has no window (use --max-context)"
            )
        fold = _fold_inputs(g, nq, npdt, zero, one, n_new, shape_ids, folded)
    cos, sin = _rotary_tables(model, max_positions)
    g.init("cos_cache", cos.astype(npdt))
    g.init("sin_cache", sin.astype(npdt))

    # ---- embeddings
    embed = g.init("model.embed_tokens.weight", _np(sd["model.embed_tokens.weight"], npdt))
    x = g.op("Gather", [embed, "input_ids"], name="embed", axis=0)
    if folded:  # token-major [new, B, H]: a layer's [new, B, heads x D] is [1, new, B x heads x D] as it lies
        x = g.op("Transpose", [x], name="fold/embed_t", perm=[1, 0, 2])
    residual = None

    def norm(inp, weight_key: str, res):
        """(normed, new residual): RMSNorm(inp + res) and inp + res (just inp for the first)."""
        w = g.init(weight_key, _np(sd[weight_key], npdt))
        if res is None:
            return g.op(
                "SimplifiedLayerNormalization", [inp, w], name=weight_key + "/norm", axis=-1, epsilon=eps, stash_type=1
            ), inp
        outs = g.op(
            "SkipSimplifiedLayerNormalization",
            [inp, res, w],
            [f"{weight_key}/normed", "", "", f"{weight_key}/residual"],
            domain=MS_DOMAIN,
            name=weight_key + "/skipnorm",
            epsilon=eps,
        )
        return outs[0], outs[3]

    def linear(inp, prefix: str, keys: list[str], out_name: str):
        """One MatMul over the concatenated output rows of ``keys`` (+ their biases)."""
        w = np.concatenate([_np(sd[f"{k}.weight"], npdt) for k in keys], axis=0).T
        y = g.op("MatMul", [inp, g.init(f"{prefix}.weight_t", w)], name=f"{prefix}/matmul")
        biases = [sd.get(f"{k}.bias") for k in keys]
        if any(b is not None for b in biases):
            b = np.concatenate(
                [
                    _np(bb, npdt) if bb is not None else np.zeros(sd[f"{k}.weight"].shape[0], npdt)
                    for bb, k in zip(biases, keys)
                ]
            )
            y = g.op("Add", [y, g.init(f"{prefix}.bias", b)], name=f"{prefix}/bias")
        return y

    for i in range(L):
        p = f"model.layers.{i}"
        xn, residual = norm(x, f"{p}.input_layernorm.weight", residual)
        qkv_keys = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        if f"{p}.self_attn.qkv_proj.weight" in sd:  # Phi-3: Q, K, V rows already in one matrix
            qkv_keys = [f"{p}.self_attn.qkv_proj"]
        qkv = linear(xn, f"{p}.self_attn.qkv_proj", qkv_keys, "qkv")
        if f"{p}.self_attn.q_norm.weight" in sd:  # Qwen3: RMSNorm over each head of Q and K, before rotary
            qkv = _qk_norm(g, qkv, f"{p}.self_attn", sd, nq, nkv, D, eps, npdt)
        scale = float(getattr(model.model.layers[i].self_attn, "scaling", D**-0.5))
        if folded:
            attn = _folded_attention(
                g, qkv, i, nq, nkv, D, scale, fold, inputs[FUSED_CACHE_START + 2 * i],
                inputs[FUSED_CACHE_START + 1 + 2 * i], outputs[2 + 2 * i], outputs[3 + 2 * i],
            )  # fmt: skip
        elif batched:
            attn = _batched_attention(
                g, qkv, i, nq, nkv, D, scale, batch_bias, inputs[FUSED_CACHE_START + 2 * i],
                inputs[FUSED_CACHE_START + 1 + 2 * i], outputs[2 + 2 * i], outputs[3 + 2 * i],
            )  # fmt: skip
        else:
            attn = g.op(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    inputs[FUSED_CACHE_START + 2 * i],
                    inputs[FUSED_CACHE_START + 1 + 2 * i],
                    seqlens_k,
                    total_len,
                    "cos_cache",
                    "sin_cache",
                    "position_ids",
                    attention_bias,
                ],
                [f"{p}/attn", outputs[2 + 2 * i], outputs[3 + 2 * i]],
                domain=MS_DOMAIN,
                name=f"{p}/gqa",
                num_heads=nq,
                kv_num_heads=nkv,
                do_rotary=1,
                rotary_interleaved=0,
                local_window_size=window,
                scale=scale,
            )[0]
        x = linear(attn, f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"], "o")
        xn, residual = norm(x, f"{p}.post_attention_layernorm.weight", residual)
        gu_keys = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        if f"{p}.mlp.gate_up_proj.weight" in sd:  # Phi-3: gate rows, then up rows, in one matrix
            gu_keys = [f"{p}.mlp.gate_up_proj"]
        gu = linear(xn, f"{p}.mlp.gate_up_proj", gu_keys, "gu")
        inter = sd[f"{p}.mlp.down_proj.weight"].shape[1]
        gate, up = g.op("Split", [gu, g.const(f"{p}.mlp.split", [inter, inter])], 2, name=f"{p}/mlp/split", axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up], name=f"{p}/mlp/swiglu")
        x = linear(act, f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"], "down")

    w = g.init("model.norm.weight", _np(sd["model.norm.weight"], npdt))
    g.nodes.append(
        h.make_node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, w],
            ["fold/hidden_t" if folded else "hidden_states"],
            name="model.norm/skipnorm",
            domain=MS_DOMAIN,
            epsilon=eps,
        )
    )
    if folded:
        g.op("Transpose", ["fold/hidden_t"], ["hidden_states"], name="fold/hidden", perm=[1, 0, 2])
    # logits for the last num_logits rows only: a prompt chunk needs none (or its last row's), a
    # step needs all; the lm_head is a fifth of SmolLM2's weights and the logits [rows, vocab] the
    # largest tensor of a prefill
    lm = _np(sd["lm_head.weight"], npdt).T
    first = g.op("Sub", [n_new, "num_logits"], name="logits_first")
    rows = g.op("Slice", ["hidden_states", first, n_new, one], name="logits_rows")
    g.nodes.append(h.make_node("MatMul", [rows, g.init("lm_head.weight_t", lm)], ["logits"], name="lm_head/matmul"))
    screened = (
        screen and not batched and not folded and npdt == np.float32 and H % SCREEN_BLOCK == 0 and V > SCREEN_CANDIDATES
    )
    if screened:
        tied = "model.embed_tokens.weight" in sd and bool(
            (sd["lm_head.weight"] is sd["model.embed_tokens.weight"])
            or np.array_equal(lm.T, _np(sd["model.embed_tokens.weight"], npdt))
        )
        rows_name = embed if tied else g.init("lm_head.weight", lm.T)  # [V, H], row-major: candidates gathered
        _screen(g, lm.T, rows_name, n_new, one)

    kv_in = [nkv, "cache_capacity"]
    past_dims: list = ["batch", kv_in[0], "past_capacity", D]
    present_dims: list = ["batch", kv_in[0], "new_tokens" if batched else "present_capacity", D]
    if folded:  # the slots' cache as one sequence with batch x kv_heads heads, written in place
        past_dims = [1, "batch_kv_heads", "past_capacity", D]
        present_dims = [1, "batch_kv_heads", "present_capacity", D]
    graph_inputs = [
        h.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new_tokens"]),
        h.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "new_tokens"]),
        h.make_tensor_value_info("tree_mask", TensorProto.BOOL, ["batch", "new_tokens", "new_tokens"]),
        h.make_tensor_value_info("cache_lengths", TensorProto.INT64, ["batch"]),
        h.make_tensor_value_info("num_logits", TensorProto.INT64, [1]),
        *[h.make_tensor_value_info(n, tdt, past_dims) for n in inputs[FUSED_CACHE_START:]],
    ]
    graph_outputs = [
        h.make_tensor_value_info("logits", tdt, ["batch", "logits_rows", V]),
        h.make_tensor_value_info("hidden_states", tdt, ["batch", "new_tokens", H]),
        *[h.make_tensor_value_info(n, tdt, present_dims) for n in outputs[2:]],
    ]
    if screened:  # optional: fed 0 unless asked (an input with an initializer of the same name)
        g.const(SCREEN_INPUT, [0])
        g.init(SCREEN_NOISE, np.zeros((1, 1), np.float32))
        graph_inputs.append(h.make_tensor_value_info(SCREEN_INPUT, TensorProto.INT64, [1]))
        graph_inputs.append(h.make_tensor_value_info(SCREEN_NOISE, tdt, ["screen_noise_rows", "screen_noise_vocab"]))
        K = SCREEN_CANDIDATES
        graph_outputs += [
            h.make_tensor_value_info("screen_ids", TensorProto.INT64, ["batch", "screened_rows", K]),
            h.make_tensor_value_info("screen_logits", tdt, ["batch", "screened_rows", K]),
            h.make_tensor_value_info("screen_bound", tdt, ["batch", "screened_rows"]),
        ]
    graph = h.make_graph(g.nodes, "medusa_trt_fused_backbone", graph_inputs, graph_outputs, g.inits)
    proto = h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", FUSED_OPSET), h.make_opsetid(MS_DOMAIN, 1)],
        producer_name="medusa-trt",
        ir_version=10,
    )
    proto.doc_string = f"medusa-trt fused {'batch ' if batched else 'folded ' if folded else ''}backbone ({type(model).__name__}, {dtype})"
    return proto


def _additive_bias(g: _Graph, visible: str, npdt) -> str:
    """0 where ``visible``, else the dtype's lowest finite value (a weight of exactly 0 after the
    softmax, where -inf would give NaN on a row that sees nothing)."""
    lowest = float(np.finfo(npdt).min)
    zero = g.init("const/bias_zero", np.zeros((), npdt))
    masked = g.init("const/bias_masked", np.array(lowest, npdt))
    return g.op("Where", [visible, zero, masked])


def _batch_bias(g: _Graph, group: int, past0: str, npdt, zero: str, one: str, n_new: str) -> str:
    """The batch graph's additive attention bias ``[batch, 1, group x new, capacity + new]``, once
    for all layers: a new token of sequence b sees cache entries ``0 .. cache_lengths[b] - 1`` and
    the new tokens ``tree_mask[b]`` allows; the rows are repeated per query head of a KV group, in
    the order :func:`_batched_attention` lays out its grouped queries."""
    capacity = g.op("Gather", [g.op("Shape", [past0]), g.const("const/two", [2])], name="capacity", axis=0)  # [1]
    scalar = g.op("Squeeze", [capacity, zero])
    cols = g.op("Range", [g.op("Squeeze", [zero, zero]), scalar, g.op("Squeeze", [one, zero])])  # [capacity]
    lens = g.op("Unsqueeze", ["cache_lengths", g.const("const/axes12", [1, 2])])  # [B, 1, 1]
    past = g.op("Less", [cols, lens])  # [B, 1, capacity]
    batch = g.op("Gather", [g.op("Shape", ["input_ids"]), zero], axis=0)
    past = g.op("Expand", [past, g.op("Concat", [batch, n_new, capacity], axis=0)])  # [B, new, capacity]
    visible = g.op("Concat", [past, "tree_mask"], axis=2)  # [B, new, capacity + new]
    bias = g.op("Unsqueeze", [_additive_bias(g, visible, npdt), one])  # [B, 1, new, capacity + new]
    g.split_sizes = g.op("Concat", [capacity, n_new], axis=0, name="split_sizes")  # type: ignore[attr-defined]
    return g.op("Tile", [bias, g.const("const/group_tile", [1, 1, group, 1])], name="batch_bias")


def _qk_norm(g: _Graph, qkv: str, prefix: str, sd, nq: int, nkv: int, D: int, eps: float, npdt) -> str:
    """Qwen3's per-head RMSNorm of Q and K (``q_norm``, ``k_norm``: one ``[head_dim]`` weight each) on the
    projected ``qkv`` ``[..., (nq + 2 nkv) x D]``, which goes back packed: every attention flavour reads it as
    before. A SimplifiedLayerNormalization over the last axis of ``[..., heads, D]`` per part."""
    q, k, v = g.op(
        "Split",
        [qkv, g.const(f"{prefix}/qk_norm_sizes", [nq * D, nkv * D, nkv * D])],
        3,
        name=f"{prefix}/qk_split",
        axis=-1,
    )
    heads = g.const(f"{prefix}/qk_norm_heads", [0, 0, -1, D])
    flat = g.const(f"{prefix}/qk_norm_flat", [0, 0, -1])
    normed = []
    for t, part in ((q, "q"), (k, "k")):
        w = g.init(f"{prefix}.{part}_norm.weight", _np(sd[f"{prefix}.{part}_norm.weight"], npdt))
        n = g.op(
            "SimplifiedLayerNormalization",
            [g.op("Reshape", [t, heads]), w],
            name=f"{prefix}/{part}_norm",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
        normed.append(g.op("Reshape", [n, flat]))
    return g.op("Concat", [*normed, v], name=f"{prefix}/qk_normed", axis=-1)


def _batched_attention(g: _Graph, qkv, i, nq, nkv, D, scale, bias, past_k, past_v, new_k, new_v) -> str:
    """One layer's attention for several sequences in one call, from standard ops (ONNX Runtime's
    GroupQueryAttention takes several new tokens over a cache at batch 1 only).

    Queries are grouped by KV head (``[B, kv_heads, group x new, D]``), so each cached K/V is read
    once per group, never repeated. The scores over the cache and over the new tokens are two
    MatMuls whose results are concatenated (the cache itself is never copied), biased, softmaxed
    once, and split again for the two value MatMuls. Rotary by ``position_ids``
    (``com.microsoft.RotaryEmbedding`` with the model's own tables). The new tokens' rotated K and
    V go out as ``present.{i}.*`` ``[B, kv_heads, new, D]``: the runtime keeps the accepted ones.
    """
    p = f"model.layers.{i}/battn"
    group = nq // nkv
    q, k, v = g.op("Split", [qkv, g.const(f"{p}/qkv_sizes", [nq * D, nkv * D, nkv * D])], 3, name=f"{p}/split", axis=-1)
    rot: dict[str, Any] = {"domain": MS_DOMAIN, "interleaved": 0}  # op()'s domain plus a node attribute
    q = g.op("RotaryEmbedding", [q, "position_ids", "cos_cache", "sin_cache"], name=f"{p}/rope_q", num_heads=nq, **rot)
    k = g.op("RotaryEmbedding", [k, "position_ids", "cos_cache", "sin_cache"], name=f"{p}/rope_k", num_heads=nkv, **rot)
    q = g.op("Reshape", [q, g.const(f"{p}/q5", [0, 0, nkv, group, D])])
    q = g.op("Transpose", [q], perm=[0, 2, 3, 1, 4])  # [B, kv, group, new, D]
    q = g.op("Reshape", [q, g.const(f"{p}/q4", [0, nkv, -1, D])])  # [B, kv, group x new, D]
    kv4 = g.const(f"{p}/kv4", [0, 0, nkv, D])
    g.op("Transpose", [g.op("Reshape", [k, kv4])], [new_k], name=f"{p}/new_k", perm=[0, 2, 1, 3])
    g.op("Transpose", [g.op("Reshape", [v, kv4])], [new_v], name=f"{p}/new_v", perm=[0, 2, 1, 3])
    mm = {"domain": MS_DOMAIN, "transB": 1, "alpha": scale}
    s_past = g.op("FusedMatMul", [q, past_k], name=f"{p}/qk_past", **mm)  # [B, kv, gN, capacity]
    s_new = g.op("FusedMatMul", [q, new_k], name=f"{p}/qk_new", **mm)  # [B, kv, gN, new]
    s = g.op("Add", [g.op("Concat", [s_past, s_new], axis=-1), bias])
    probs = g.op("Softmax", [s], axis=-1)
    p_past, p_new = g.op("Split", [probs, g.split_sizes], 2, name=f"{p}/split_probs", axis=-1)  # type: ignore[attr-defined]
    o = g.op("Add", [g.op("MatMul", [p_past, past_v]), g.op("MatMul", [p_new, new_v])])  # [B, kv, gN, D]
    o = g.op("Reshape", [o, g.const(f"{p}/o5", [0, nkv, group, -1, D])])
    o = g.op("Transpose", [o], perm=[0, 3, 1, 2, 4])  # [B, new, kv, group, D]
    return g.op("Reshape", [o, g.const(f"{p}/o3", [0, 0, nq * D])])


def _fold_inputs(g: _Graph, nq: int, npdt, zero: str, one: str, n_new: str, shape_ids: str, folded: int) -> dict:
    """What every layer of the folded graph shares, computed once: the new tokens' place ``P``
    (the longest cache of the call: every sequence's new entries go to ``P ..``, past whatever
    any slot of the call holds), GroupQueryAttention's lengths for the folded sequence
    (``P + new``), the bias ``[1, B x heads, new, P + new]`` (sequence b's heads see its first
    ``cache_lengths[b]`` entries and the new tokens its ``tree_mask`` allows, nothing between),
    the token-major positions, and the branch conditions on ``B``."""
    from onnx import TensorProto

    batch = g.op("Gather", [shape_ids, zero], name="fold/batch", axis=0)  # [1]
    P = g.op("ReduceMax", ["cache_lengths"], name="fold/place", keepdims=1)  # [1]
    total = g.op("Add", [P, n_new])  # [1]
    seqlens = g.op("Cast", [g.op("Sub", [total, one])], name="fold/seqlens_k", to=TensorProto.INT32)
    total_len = g.op("Cast", [g.op("Squeeze", [total, zero])], name="fold/total_sequence_length", to=TensorProto.INT32)
    scalar = lambda t: g.op("Squeeze", [t, zero])
    cols = g.op("Range", [scalar(zero), scalar(total), scalar(one)])  # [T]
    is_past = g.op("Less", [cols, g.op("Unsqueeze", ["cache_lengths", g.const("const/axes12", [1, 2])])])  # [B, 1, T]
    rel = g.op("Sub", [cols, P])  # [T]: new token rel where >= 0
    is_new = g.op("Not", [g.op("Less", [rel, zero])])
    idx = g.op("Expand", [g.op("Max", [rel, zero]), g.op("Concat", [batch, n_new, total], axis=0)])  # [B, new, T]
    in_tree = g.op("And", [g.op("GatherElements", ["tree_mask", idx], axis=2), is_new])
    visible = g.op("Or", [is_past, in_tree])  # [B, new, T]
    bias = g.op(
        "Expand",
        [
            g.op("Unsqueeze", [_additive_bias(g, visible, npdt), one]),
            g.op("Concat", [batch, g.const("const/fold_heads", [nq]), n_new, total], axis=0),
        ],
    )
    bias = g.op(
        "Reshape",
        [bias, g.op("Concat", [g.const("const/fold_one_all", [1, -1]), n_new, total], axis=0)],
        name="fold/bias",
    )
    pos = g.op("Transpose", ["position_ids"], name="fold/position_ids", perm=[1, 0])  # [new, B]
    flat = g.op("Concat", [n_new, g.const("const/fold_rest", [-1])], axis=0)  # [new, -1]
    bscalar = scalar(batch)
    conds = {
        v: g.op("Less", [bscalar, g.const(f"const/fold_b{v}", v)], name=f"fold/below_{v}") for v in range(2, folded + 1)
    }
    unfold = g.op("Concat", [n_new, batch, g.const("const/fold_width", [-1])], axis=0)  # [new, B, -1]
    return {"seqlens": seqlens, "total": total_len, "bias": bias, "pos": pos, "flat": flat, "unfold": unfold,
            "conds": conds, "sizes": list(range(min(2, folded), folded + 1))}  # fmt: skip


def _folded_attention(g: _Graph, qkv, i, nq, nkv, D, scale, fold, past_k, past_v, present_k, present_v) -> str:
    """One layer's attention for several sequences in one call on ONNX Runtime's
    GroupQueryAttention, the cache read and written in place.

    GroupQueryAttention takes several new tokens over a cache at batch 1 only. The slots' cache
    ``[B, kv_heads, capacity, D]`` is, as it lies in memory, one sequence ``[1, B x kv_heads,
    capacity, D]`` whose KV heads are all the sequences' heads, and token-major activations
    ``[new, B, heads x D]`` are ``[1, new, B x heads x D]``: query head ``b x heads + h`` then
    reads KV head ``b x kv_heads + h // group``, sequence b's own. So one call attends for all
    sequences; the bias of :func:`_fold_inputs` keeps each in its cache and tree, and rotary
    runs before (``com.microsoft.RotaryEmbedding`` by each token's own position). The head
    counts are attributes, so the call branches on ``B`` (``If`` nodes over 2 .. the graph's
    largest batch, :data:`FOLD_MAX_BATCH`); each branch is one GroupQueryAttention node. Calls of
    one sequence belong on ``model.onnx``.
    """
    h = g.h
    p = f"model.layers.{i}/fattn"
    q, k, v = g.op("Split", [qkv, g.const(f"{p}/qkv_sizes", [nq * D, nkv * D, nkv * D])], 3, name=f"{p}/split", axis=-1)
    rot: dict[str, Any] = {"domain": MS_DOMAIN, "interleaved": 0}  # op()'s domain plus a node attribute
    q = g.op("RotaryEmbedding", [q, fold["pos"], "cos_cache", "sin_cache"], name=f"{p}/rope_q", num_heads=nq, **rot)
    k = g.op("RotaryEmbedding", [k, fold["pos"], "cos_cache", "sin_cache"], name=f"{p}/rope_k", num_heads=nkv, **rot)
    zero = "const/zero"
    q, k, v = (
        g.op("Unsqueeze", [g.op("Reshape", [t, fold["flat"]]), zero], name=f"{p}/fold_{c}")
        for t, c in zip((q, k, v), "qkv")
    )
    out = f"{p}/out"

    def branch(sizes: list[int], outs: list[str], tag: str):
        """Nodes writing ``outs`` for a batch of one of ``sizes``: a GroupQueryAttention, or an If."""
        if len(sizes) == 1:
            b = sizes[0]
            return [
                h.make_node(
                    "GroupQueryAttention",
                    [q, k, v, past_k, past_v, fold["seqlens"], fold["total"], "", "", "", fold["bias"]],
                    outs,
                    name=f"{p}/gqa_b{b}",
                    domain=MS_DOMAIN,
                    num_heads=b * nq,
                    kv_num_heads=b * nkv,
                    do_rotary=0,
                    local_window_size=-1,
                    scale=scale,
                )  # fmt: skip
            ]
        # the smallest batch the fewest levels down: [2] | [3 ..], [3, 4] | [5 ..], then halves
        cut = 1 << (sizes[0] - 1).bit_length()  # the power of two at or above the smallest size
        mid = sizes.index(cut + 1) if cut + 1 in sizes else (len(sizes) + 1) // 2
        subs = []
        for part, side in ((sizes[:mid], "lo"), (sizes[mid:], "hi")):
            names = [f"{o}/{tag}{side}" for o in outs]
            subs.append(
                h.make_graph(
                    branch(part, names, tag + side[0]),
                    f"{p}_{tag}{side}",
                    [],
                    [h.make_tensor_value_info(n, g.tdt, None) for n in names],
                )  # fmt: skip
            )
        return [
            h.make_node(
                "If", [fold["conds"][sizes[mid]]], outs, name=f"{p}/if_{tag}", then_branch=subs[0], else_branch=subs[1]
            )
        ]

    g.nodes.extend(branch(fold["sizes"], [out, present_k, present_v], "b"))
    # [1, new, B x heads x D] -> [new, B, heads x D]
    return g.op("Reshape", [out, fold["unfold"]], name=f"{p}/unfold")


def screen_weights(w: np.ndarray) -> dict[str, np.ndarray]:
    """The lm_head screen's tensors for weight rows ``w`` ``[V, H]`` (float32): ``q`` uint8
    ``[V, H / B, B]`` (int8 + 128, MatMulNBits' 8-bit layout), ``scales`` ``[V * H / B]`` (a
    block's largest magnitude / 127), ``norm`` ``[V]`` (|w_i| of the quantized rows) and ``err``
    ``[V]`` (|w_i - quantized w_i|: 0 for weights that were int8 blocks already, as SmolLM2's are)."""
    V, H = w.shape
    w = w.astype(np.float32)
    blocks = w.reshape(V, H // SCREEN_BLOCK, SCREEN_BLOCK)
    scales = np.abs(blocks).max(-1) / np.float32(127)
    q = np.clip(np.rint(blocks / np.where(scales == 0, 1, scales)[..., None]), -127, 127)
    deq = (q * scales[..., None]).reshape(V, H)
    norm = np.sqrt(np.square(deq, dtype=np.float64).sum(1))
    err = np.sqrt(np.square(w.astype(np.float64) - deq).sum(1))
    return {
        "q": (q + 128).astype(np.uint8),
        "scales": scales.astype(np.float32).reshape(-1),
        "norm": norm.astype(np.float32),
        "err": err.astype(np.float32),
    }


def strip_screen(proto):
    """``proto`` (a fused ``ModelProto``) without the lm_head screen: its nodes, input, outputs and
    the initializers only it used (a quantized backbone's logits come from its own quantized
    lm_head, which the screen's exact scores are not: exporter.quantize removes it). In place."""
    g = proto.graph
    keep = [n for n in g.node if not n.name.startswith("screen/")]
    used = {name for n in keep for name in n.input}
    del g.node[:]
    g.node.extend(keep)
    # the screen's own tensors (an untied model's gathered lm_head rows included) that nothing left reads
    owned = lambda name: name.startswith("screen") or name in (SCREEN_INPUT, SCREEN_NOISE, "lm_head.weight")
    inits = [t for t in g.initializer if t.name in used or not owned(t.name)]
    del g.initializer[:]
    g.initializer.extend(inits)
    for field, drop in ((g.input, {SCREEN_INPUT, SCREEN_NOISE}), (g.output, set(SCREEN_OUTPUTS))):
        kept = [v for v in field if v.name not in drop]
        del field[:]
        field.extend(kept)
    return proto


def screen_reference(x: np.ndarray, t: dict[str, np.ndarray]) -> np.ndarray:
    """``upper`` ``[rows, V]`` of :func:`_screen` in float64 numpy, for hidden rows ``x`` ``[rows, H]``
    and :func:`screen_weights`' tensors ``t`` (what the graph's TopK ranks, plus ``screen_noise``;
    tests compare the two)."""
    x = np.asarray(x, dtype=np.float64)
    R, H = x.shape
    blocks = x.reshape(R, H // SCREEN_BLOCK, SCREEN_BLOCK)
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True) / 127, 1e-30)
    xh = (np.rint(blocks / scale) * scale).reshape(R, H)
    V = t["norm"].shape[0]
    deq = (t["q"].astype(np.float64) - 128) * t["scales"].reshape(V, -1, 1)
    approx = xh @ deq.reshape(V, H).T
    e = np.linalg.norm(x - xh, axis=1, keepdims=True)
    a = np.linalg.norm(x, axis=1, keepdims=True)
    norm, err = t["norm"].astype(np.float64), t["err"].astype(np.float64)
    return approx + e * norm + a * (err + screen_rel(H) * norm) + SCREEN_ABS


def _screen(g: _Graph, w: np.ndarray, rows_weight: str, n_new: str, one: str) -> None:
    """Greedy decoding's and coupled sampling's lm_head without the float one: the last
    ``num_screened`` rows' top tokens (of the logits, or of the logits plus ``screen_noise``).

    A row x (a final-normed hidden state) is rounded to int8 blocks of ``SCREEN_BLOCK`` (x^: a
    block's scale is its largest |x| / 127) and multiplied, by ONNX Runtime's ``MatMulNBits``
    with int8 compute, by the lm_head's own int8 blocks (w^): a quarter of the float lm_head's
    bytes, the fifth of SmolLM2's weights every step reads. x^ is int8 blocks already, so the
    kernel's own quantization of it is exact and the product is x^ . w^_i up to float rounding.
    Then for every token i

        x . w_i = x^ . w^_i + (x - x^) . w^_i + x . (w_i - w^_i)
               <= approx_i + |x - x^| |w^_i| + |x| |w_i - w^_i|          (Cauchy-Schwarz)

    and ``upper_i`` adds float slack (:func:`screen_rel` |x| |w^_i| + ``SCREEN_ABS``) to that bound.
    The ``SCREEN_CANDIDATES`` tokens of highest ``upper`` are scored exactly (their float rows
    gathered, ``screen_logits``); ``screen_bound`` is the next ``upper``, above every other
    token's logit. Where the best exact candidate beats it, that candidate is the row's argmax
    (the runtime checks this, and falls back to the float row where it does not hold: rarely,
    for SmolLM2 on none of ~1,000 rows of its own answers).

    Coupled sampling draws ``argmax(logits / T + g)`` (runtime.decode.PositionNoise), the argmax
    of ``logits + T g``: the runtime feeds ``T g`` as ``screen_noise`` (one row per screened
    row, flattened over the batch as the hidden rows are), the graph ranks ``upper + T g``, and the
    33rd of those bounds every other token's ``logit + T g`` as ``upper`` bounds its logit (the
    same noise on both sides). ``screen_logits`` stay the candidates' plain logits; the runtime
    adds their noise. Its default, zeros ``[1, 1]``, is greedy's ranking."""
    K = SCREEN_CANDIDATES
    V, H = w.shape
    t = screen_weights(w)
    nb = H // SCREEN_BLOCK
    f32 = lambda v: np.asarray(v, dtype=np.float32)
    # more rows asked than the call has: all of them (a negative start would wrap around)
    first = g.op("Max", [g.op("Sub", [n_new, SCREEN_INPUT], name="screen/first0"), g.const("screen/no_rows", [0])],
                 name="screen/first")  # fmt: skip
    x3 = g.op("Slice", ["hidden_states", first, n_new, one], name="screen/rows")  # [B, s, H]
    x = g.op("Reshape", [x3, g.const("screen/shape_rows", [-1, H])], name="screen/x")  # [R, H]
    xb = g.op("Reshape", [x, g.const("screen/shape_blocks", [-1, nb, SCREEN_BLOCK])], name="screen/blocks")
    last = g.const("screen/last_axis", [-1])
    amax = g.op("ReduceMax", [g.op("Abs", [xb], name="screen/abs"), last], name="screen/amax", keepdims=1)
    scale = g.op("Div", [amax, g.init("screen/c127", f32(127))], name="screen/scale0")
    scale = g.op("Max", [scale, g.init("screen/tiny", f32(1e-30))], name="screen/scale")
    q = g.op("Round", [g.op("Div", [xb, scale], name="screen/div")], name="screen/round")
    xh = g.op("Reshape", [g.op("Mul", [q, scale], name="screen/deq"), g.const("screen/shape_rows2", [-1, H])],
              name="screen/xhat")  # fmt: skip
    e = g.op("ReduceL2", [g.op("Sub", [x, xh], name="screen/residual"), last], name="screen/e_norm", keepdims=1)
    a = g.op("ReduceL2", [x, last], name="screen/x_norm", keepdims=1)  # [R, 1]
    approx = g.op(
        "MatMulNBits",
        [xh, g.init("screen.weight_q", t["q"]), g.init("screen.weight_scales", t["scales"])],
        domain=MS_DOMAIN,
        name="screen/matmul",
        K=H,
        N=V,
        bits=8,
        block_size=SCREEN_BLOCK,
        accuracy_level=4,
    )  # [R, V]
    norm, err = t["norm"], t["err"]
    slack = g.op("Mul", [e, g.init("screen.weight_norm", norm)], name="screen/slack_e")
    slack2 = g.op("Mul", [a, g.init("screen.weight_err", (err + screen_rel(H) * norm).astype(np.float32))],
                  name="screen/slack_x")  # fmt: skip
    upper = g.op("Add", [g.op("Add", [approx, slack], name="screen/upper0"), slack2], name="screen/upper1")
    upper = g.op("Add", [upper, g.init("screen/abs_slack", f32(SCREEN_ABS))], name="screen/upper2")
    upper = g.op("Add", [upper, SCREEN_NOISE], name="screen/upper")  # coupled sampling's T g (default 0)
    top_v, top_i = g.op("TopK", [upper, g.const("screen/k", [K + 1])], 2, name="screen/topk", axis=-1)
    cand = g.op("Slice", [top_i, g.const("screen/zero", [0]), g.const("screen/kk", [K]), last], name="screen/cand")
    bound = g.op("Slice", [top_v, g.const("screen/kk2", [K]), g.const("screen/k1", [K + 1]), last],
                 name="screen/bound_col")  # fmt: skip
    rows = g.op("Gather", [rows_weight, cand], name="screen/gather", axis=0)  # [R, K, H]
    col = g.op("Unsqueeze", [x, last], name="screen/x_col")  # [R, H, 1]
    exact = g.op("MatMul", [rows, col], name="screen/exact")  # [R, K, 1]
    out_shape = g.op("Concat", [g.op("Shape", [x3], name="screen/x3_shape", start=0, end=2), g.const("screen/k_dim", [K])],
                     name="screen/out_shape", axis=0)  # fmt: skip
    # allowzero: no row screened is a shape [B, 0, K], not "copy that dimension"
    g.op("Reshape", [cand, out_shape], ["screen_ids"], name="screen/ids", allowzero=1)
    g.op("Reshape", [exact, out_shape], ["screen_logits"], name="screen/logits", allowzero=1)
    g.op("Reshape", [bound, g.op("Shape", [x3], name="screen/x3_shape2", start=0, end=2)], ["screen_bound"],
         name="screen/bound", allowzero=1)  # fmt: skip


def save_model(proto, path: Path, external_data_threshold_mb: float = 1024.0) -> dict:
    """Save ``proto`` at ``path``, its tensors in ``<path>.data`` when they exceed the
    threshold (protobuf cannot hold 2 GiB); returns {file: bytes}."""
    import onnx

    path = Path(path)
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    external = weights > min(external_data_threshold_mb, MAX_EXTERNAL_DATA_THRESHOLD_MB) * 2**20
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.remove(data)
    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))
    files = {path.name: path.stat().st_size}
    if data.exists():
        files[data.name] = data.stat().st_size
    return files


BATCH_FILE = "batch.onnx"
FOLD_FILE = "fold.onnx"
# the folded graph's largest batch: its If nodes branch over 2 .. this many sequences (one sequence
# runs on model.onnx, more than this many on batch.onnx). Each level of If costs ~1.5-2 ms a call
# (SmolLM2, 2 threads, 2 sequences x 6 tokens: 53.2 / 55.3 / 58.4 ms with 1 / 2 / 4 levels, batch.onnx
# 60.6), so the smallest batches are the fewest levels down: B = 2 one, 3-4 three, 5-8 four. Up to 8,
# so that a server of up to 8 slots never loads batch.onnx (a third copy of the weights)
FOLD_MAX_BATCH = 8


def batch_io(num_layers: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Input names, output names and named dynamic axes of ``batch.onnx``: the fused graph's
    names; the cache inputs span the bound buffer (``past_capacity``), the ``present.*`` outputs
    hold the new tokens' entries alone."""
    inputs, outputs, axes = fused_io(num_layers)
    axes.update({name: ["batch", "kv_heads", "new_tokens"] for name in outputs[2:]})
    return inputs, outputs, axes


def fold_io(num_layers: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Input names, output names and named dynamic axes of ``fold.onnx``: the fused graph's
    names; the cache inputs and the ``present.*`` outputs are the slots' buffer as one sequence
    ``[1, batch x kv_heads, capacity, head_dim]``, bound in place."""
    inputs, outputs, axes = fused_io(num_layers)
    fold = ["one", "batch_kv_heads", "capacity"]
    axes.update({name: fold for name in inputs[FUSED_CACHE_START:] + outputs[2:]})
    return inputs, outputs, axes


def _external_index(path: Path) -> dict:
    """{initializer name: (data type, dims, {external_data key: value})} of a graph saved with
    external data."""
    import onnx

    index = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            index[t.name] = (t.data_type, tuple(t.dims), {e.key: e.value for e in t.external_data})
    return index


def write_batch_graph(model, folder: Path, backbone_file: str, dtype: str, max_positions: int, folded: int = 0) -> dict:
    """Write ``batch.onnx`` (``folded``: ``fold.onnx`` for up to that many sequences a call)
    next to the fused ``backbone_file``, its weights read from the
    backbone's own ``.data`` file (no second copy on disk): every initializer whose bytes are
    already there is stored as a reference to them; the few small ones that are not stay in the
    graph. A backbone saved as one file is first re-saved with its tensors in ``.data``.
    Returns {file: bytes} of what changed."""
    import onnx

    folder = Path(folder)
    path = folder / backbone_file
    data = path.with_name(path.name + ".data")
    files = {}
    if not data.exists():
        proto = onnx.load(str(path))
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
            size_threshold=1024,
        )  # fmt: skip
        del proto
        files = {path.name: path.stat().st_size, data.name: data.stat().st_size}
    index = _external_index(path)
    proto = build_fused_backbone(model, dtype=dtype, max_positions=max_positions, batched=not folded, folded=folded)
    blob = np.memmap(data, dtype=np.uint8, mode="r")
    shared = inline = 0
    for t in proto.graph.initializer:
        ref = index.get(t.name)
        raw = t.raw_data
        if ref is None or ref[0] != t.data_type or ref[1] != tuple(t.dims) or not raw:
            inline += len(raw)
            continue
        ext = ref[2]
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", len(raw)))
        if length != len(raw) or not np.array_equal(blob[offset : offset + length], np.frombuffer(raw, np.uint8)):
            inline += len(raw)
            continue
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        shared += length
    del blob
    out = folder / (FOLD_FILE if folded else BATCH_FILE)
    onnx.save_model(proto, str(out))
    files[out.name] = out.stat().st_size
    import logging

    logging.getLogger("medusa_trt.exporter").info(
        "wrote %s: %.1f MiB of weights shared with %s, %.2f MiB in the graph", out.name, shared / 2**20, data.name,
        inline / 2**20,
    )  # fmt: skip
    return files
