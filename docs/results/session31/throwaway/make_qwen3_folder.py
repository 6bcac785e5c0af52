"""A Qwen3 (or Phi-3) Hugging Face folder the size of SmolLM2-135M (30 layers, hidden 576, 9 query and 3 KV heads
of 64, intermediate 1536, tied embeddings), random weights (Qwen3's q/k norm weights drawn around 1), with SmolLM2's
tokenizer (vocabulary 49,152): other architectures to time our fused graph against onnxruntime-genai's builder on
the same weights. Usage: python make_qwen3_folder.py OUT [qwen3|phi3]"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from exporter.models import resolve_model

out = Path(sys.argv[1])
arch = sys.argv[2] if len(sys.argv) > 2 else "qwen3"
config_cls, model_cls = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}[arch]
smol = resolve_model("smollm2-135m")
cfg = config_cls(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.04,
    pad_token_id=0,
)
cfg.architectures = [model_cls.__name__]
torch.manual_seed(0)
model = model_cls(cfg).eval()
with torch.no_grad():
    for layer in model.model.layers if arch == "qwen3" else []:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.normal_(1.0, 0.2)
model.save_pretrained(str(out))
for f in smol.iterdir():
    if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(f, out / f.name)
print(out, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
