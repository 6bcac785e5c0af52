"""PyTorch reference backend: the graph contract run eagerly on a Hugging Face model.

It runs :class:`exporter.step.BackboneStep` (the module the exporter traces) over the
same numpy cache as the ONNX Runtime backend, so it is the reference every exported
engine is compared with. It lives with the model code it runs (the runtime never imports
torch or the exporter).
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.step import BackboneStep, heads_step
from runtime.artifact import ModelSpec
from runtime.backend import GraphBackend


def spec_from_hf(model, heads=None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config (and optional MedusaHeads)."""
    c = model.config
    eos = c.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelSpec(
        architecture=(c.architectures or [type(model).__name__])[0],
        num_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        hidden_size=c.hidden_size,
        vocab_size=c.vocab_size,
        max_context=c.max_position_embeddings,
        eos_token_ids=eos_ids,
        bos_token_id=c.bos_token_id,
        num_medusa_heads=heads.config.num_heads if heads is not None else 0,
        medusa_num_layers=heads.config.num_layers if heads is not None else 0,
        medusa_shared_lm_head=heads.config.shared_lm_head if heads is not None else True,
        medusa_head_type=getattr(heads.config, "kind", "medusa") if heads is not None else "medusa",
    )


class TorchBackend(GraphBackend):
    """Drive ``model`` (a *ForCausalLM) and ``heads`` (MedusaHeads) eagerly on CPU."""

    def __init__(self, model, heads=None, max_context: int | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = model
        self.step = BackboneStep(model).eval()
        self.heads_step = heads_step(heads, model).eval() if heads is not None else None
        super().__init__(spec_from_hf(model, heads), max_context=max_context)

    def _run_backbone(self, input_ids, position_ids, tree_mask, past):
        t = self._torch
        with t.inference_mode():
            out = self.step(
                t.from_numpy(input_ids),
                t.from_numpy(position_ids),
                t.from_numpy(tree_mask),
                *[t.from_numpy(p) for p in past],
            )
        logits, hidden, *presents = [o.float().numpy() for o in out]
        return logits, hidden, presents

    def _run_heads(self, hidden: np.ndarray) -> np.ndarray:
        if self.heads_step is None:
            raise RuntimeError("this backend has no Medusa heads; decode with medusa=False")
        with self._torch.inference_mode():
            return self.heads_step(self._torch.from_numpy(hidden)).float().numpy()

    def _run_drafts(self, hidden, path_ids, path_len):
        if self.heads_step is None:
            raise RuntimeError("this backend has no Medusa heads; decode with medusa=False")
        t = self._torch
        with t.inference_mode():
            out = self.heads_step(t.from_numpy(hidden), t.from_numpy(path_ids), t.from_numpy(path_len))
        return out.float().numpy()
