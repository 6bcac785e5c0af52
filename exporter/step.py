"""The graph contract as torch modules: what ``model.onnx`` and ``heads.onnx`` compute.

:class:`BackboneStep` is traced by the exporter and run eagerly by the PyTorch reference
backend, so both follow one definition (docs/graph_contract.md):

    inputs   input_ids       int64 [batch, new]
             position_ids    int64 [batch, new]         cache length + depth in the tree
             tree_mask       bool  [batch, new, new]    True = may attend; the cache is always visible
             past_key_values.{i}.key|value  float [batch, past, kv_heads, head_dim]
    outputs  logits          float [batch, new, vocab]
             hidden_states   float [batch, new, hidden]  final-normed; the heads' input
             present.{i}.key|value          float [batch, new, kv_heads, head_dim]  new entries only

The cache is sequence-major (``[batch, past, kv_heads, head_dim]``) so that the runtime's
preallocated ``[batch, max_context, kv_heads, head_dim]`` buffer hands the graph its prefix
without a copy at batch 1, and ``present`` holds only the new entries so that the runtime
writes only the *accepted* ones into its cache (no compaction of rejected entries).

:class:`HeadsStep` runs the Medusa heads on the hidden state of one node per sequence
(the last accepted one): ``hidden_states [batch, hidden] -> medusa_logits [batch, heads, vocab]``.
The vocabulary projection runs for 1 node, not for every tree node.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from exporter.heads import MedusaHeads
from runtime.artifact import cache_names


def cast_module(module, dtype):
    """``module`` in ``dtype``: itself when it already is, else a converted copy (the caller's
    model is never changed)."""
    p = next(module.parameters(), None)
    if p is None or p.dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)


kv_names = cache_names  # the contract's cache names: runtime/artifact.py


class BackboneStep(nn.Module):
    """One forward of the backbone over ``new`` tokens given a cache of ``past`` tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a *ForCausalLM with .model (decoder) and .lm_head
        self.config = model.config

    def forward(self, input_ids, position_ids, tree_mask, *past):
        from transformers import DynamicCache

        num_layers = self.config.num_hidden_layers
        if len(past) != 2 * num_layers:
            raise ValueError(f"expected {2 * num_layers} cache tensors, got {len(past)}")
        batch, new = input_ids.shape
        past_len = past[0].shape[1]
        cache = DynamicCache(config=self.config)
        for i in range(num_layers):
            # [batch, past, kv_heads, head_dim] -> HF's [batch, kv_heads, past, head_dim]
            cache.update(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2), i)
        # 4-D boolean mask [batch, 1, new, past + new]: the whole cache, then the tree.
        # A boolean mask needs no "minus infinity" constant, so it survives fp16 unchanged.
        visible = torch.ones(batch, 1, new, past_len, dtype=torch.bool, device=input_ids.device)
        mask = torch.cat([visible, tree_mask.to(torch.bool).unsqueeze(1)], dim=-1)
        out = self.model.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
            **{_cache_kwarg(self.model.model): cache},
        )  # fmt: skip
        hidden = out.last_hidden_state
        logits = self.model.lm_head(hidden)
        presents = []
        for i in range(num_layers):
            layer = cache.layers[i]
            presents.append(layer.keys[:, :, past_len:].transpose(1, 2))
            presents.append(layer.values[:, :, past_len:].transpose(1, 2))
        return (logits, hidden, *presents)


class HeadsStep(nn.Module):
    """Medusa heads on one hidden state per sequence: [batch, hidden] -> [batch, heads, vocab]."""

    def __init__(self, heads: MedusaHeads, lm_head: nn.Module):
        super().__init__()
        self.heads = heads
        self.lm_head = lm_head

    def forward(self, hidden_states):
        return self.heads(hidden_states, self.lm_head)


class HydraStep(nn.Module):
    """Hydra heads (exporter.heads.HydraHeads) with the backbone's lm_head and input embeddings:
    hidden [rows, H], path_ids [rows, K], path_len [rows] -> [rows, V] (artifact.HYDRA_INPUTS)."""

    def __init__(self, heads, lm_head: nn.Module, embed: nn.Module):
        super().__init__()
        self.heads = heads
        self.lm_head = lm_head
        self.embed = embed

    def forward(self, hidden_states, path_ids, path_len):
        return self.heads(hidden_states, path_ids, path_len, self.lm_head, self.embed.weight)


def heads_step(heads, model) -> nn.Module:
    """The module heads.onnx is traced from: HeadsStep (Medusa) or HydraStep (Hydra)."""
    if getattr(heads.config, "kind", "medusa") == "hydra":
        return HydraStep(heads, model.lm_head, model.get_input_embeddings())
    return HeadsStep(heads, model.lm_head)


def _cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes a cache: ``cache`` (transformers 5.2x, the pinned
    version) or ``past_key_values`` (earlier releases, e.g. 5.17 on the GPU machine), which would
    otherwise swallow ``cache=`` into ``**kwargs`` and leave the cache handed in unfilled."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
