"""Medusa heads (torch): the module, and loading/saving every published layout.

Head k (0-based) predicts the token k+2 positions after the last one in the cache, i.e.
k+1 steps past the backbone's own next token. A head is ``n`` residual blocks
``x + SiLU(W x + b)`` followed by a vocabulary projection: its own ``Linear(H, V)`` or the
backbone's ``lm_head`` shared.

The module's state-dict keys are the official Medusa-1 keys (``{i}.{j}.linear.weight``,
``{i}.{j}.linear.bias``, ``{i}.{n}.weight``), so loading a checkpoint is a copy plus
checked shapes.

Layouts read by :func:`load_heads`:

* medusa-trt: ``medusa_heads.safetensors`` + ``medusa_heads.json`` (what :func:`save_heads` writes);
* Medusa-1: ``medusa_lm_head.pt`` (``torch.load(weights_only=True)``) or
  ``medusa_lm_head.safetensors`` (with or without ``{i}.{n}.weight`` projections);
* Medusa-2 full model: ``config.json`` with ``medusa_num_heads`` and ``medusa_head.*``
  tensors in the model's safetensors / ``.bin`` shards.

The head count and layer count come from the weights, never from a config (official
Medusa-1 configs say 2 heads for checkpoints that hold 5).

**Draft vocabulary** (medusa-trt layout only, optional): a sorted list of token ids
(tensor ``draft_vocab``) the heads may propose. The heads then project onto those rows of the
vocabulary only and give every other token the lowest finite logit, so the output keeps its
``[..., K, V]`` shape (the graph contract is unchanged) while the projection costs
``V' / V`` of the full one. Medusa-1 training with ``--train-vocab data`` sets it to the tokens
its softmax covered: a token that never was a target was never pushed down by the loss, and
without the restriction such tokens take the top rank where they are almost never right
(the idea of a reduced draft vocabulary is EAGLE-3's and FR-Spec's).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from runtime.artifact import HEAD_TYPES
from runtime.errors import CheckpointError
from runtime.paths import atomic_path, read_json_object, write_text_atomic

HEADS_WEIGHTS = "medusa_heads.safetensors"
HEADS_CONFIG = "medusa_heads.json"
FORMAT_VERSION = 1
DRAFT_VOCAB_KEY = "draft_vocab"


@dataclass
class HeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_lm_head: bool = True  # True: heads reuse the backbone's lm_head
    # "medusa": head k reads the last hidden state only (Medusa-1/2); "hydra": head k also reads
    # the embeddings of the k+1 tokens on its path (the root and the drafts above it), so a tree is
    # drafted level by level (HydraHeads)
    kind: str = "medusa"
    draft_vocab_size: int = 0  # > 0: the heads propose only these many tokens (the draft_vocab buffer)
    meta: dict = field(default_factory=dict)  # provenance: training data, steps, accuracy


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``; weight and bias start at zero, so a fresh block is the identity."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class _DraftProjection(nn.Module):
    """The draft-vocabulary projection both head kinds share (module doc, "Draft vocabulary")."""

    config: HeadsConfig
    draft_vocab: torch.Tensor | None

    def set_draft_vocab(self, token_ids) -> None:
        """Restrict proposals to ``token_ids`` (None: the whole vocabulary). See the module doc."""
        if token_ids is None:
            self.draft_vocab = None
            self.config.draft_vocab_size = 0
            return
        ids = torch.as_tensor(token_ids).to(torch.long).flatten()
        V = self.config.vocab_size
        if ids.numel() == 0:
            raise CheckpointError("draft vocabulary: empty (pass None for the whole vocabulary)")
        if ids.min() < 0 or (V > 0 and ids.max() >= V):
            raise CheckpointError(
                f"draft vocabulary: token ids must lie in [0, {V}), got {ids.min().item()}..{ids.max().item()}"
            )
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise CheckpointError("draft vocabulary: token ids must be sorted and distinct")
        param = next(self.parameters(), None)
        self.draft_vocab = ids if param is None else ids.to(param.device)
        self.config.draft_vocab_size = int(ids.numel())

    def _draft_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight``'s draft rows. Gathering them costs ~3x the projection itself on a CPU, so
        outside tracing and autograd the gathered copy is kept until the weight (its storage or
        in-place version) or the draft vocabulary changes; the exported graph folds it to a constant."""
        ids = self.draft_vocab
        assert ids is not None  # callers project onto draft rows only when a draft vocabulary is set
        if torch.jit.is_tracing() or (torch.is_grad_enabled() and weight.requires_grad):
            return weight.index_select(0, ids)
        # the cache holds the weight and ids themselves, so a reused address cannot be mistaken for them
        c = self.__dict__.get("_draft_rows_cache")
        if not (c and c[0] is weight and c[1] == weight._version and c[2] is ids and c[3] == ids._version):
            c = (weight, weight._version, ids, ids._version, weight.index_select(0, ids))
            self.__dict__["_draft_rows_cache"] = c
        return c[4]

    def _draft_logits(self, blocks_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Project onto the draft rows only; every other token gets the lowest finite logit."""
        ids = self.draft_vocab
        assert ids is not None  # callers project onto draft rows only when a draft vocabulary is set
        sub = blocks_out @ self._draft_rows(weight).t()
        if bias is not None:
            sub = sub + bias.index_select(0, ids)
        out = sub.new_full((*sub.shape[:-1], weight.shape[0]), torch.finfo(sub.dtype).min)
        return out.scatter(-1, ids.expand(*sub.shape[:-1], -1), sub)


class MedusaHeads(_DraftProjection):
    """K heads; ``forward(hidden [..., H], lm_head) -> logits [..., K, V]``."""

    def __init__(self, config: HeadsConfig, lm_head: nn.Module | None = None):
        super().__init__()
        self.config = config
        heads = []
        for _ in range(config.num_heads):
            layers: list[nn.Module] = [ResBlock(config.hidden_size) for _ in range(config.num_layers)]
            if not config.shared_lm_head:
                proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                if lm_head is not None:  # official init: start from the backbone's projection
                    proj.weight.data.copy_(cast(torch.Tensor, lm_head.weight).data)
                layers.append(proj)
            heads.append(nn.Sequential(*layers))
        # Heads are this module's own children "0", "1", ...: state-dict keys are the official
        # Medusa-1 keys, and stay consistent with named_parameters() inside a parent module.
        for i, head in enumerate(heads):
            self.add_module(str(i), head)
        self.register_buffer(DRAFT_VOCAB_KEY, None)
        if config.draft_vocab_size:
            raise ValueError(
                "a draft vocabulary is data, not configuration: build the heads with draft_vocab_size=0, "
                "then call set_draft_vocab(token_ids) (load_heads does)"
            )

    @property
    def heads(self) -> list[nn.Sequential]:
        """The K heads, in order: each ``num_layers`` ResBlocks (+ its own projection)."""
        return [cast(nn.Sequential, self._modules[str(i)]) for i in range(self.config.num_heads)]

    def blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual blocks only (no vocabulary projection): [..., H] -> [..., K, H]."""
        n = self.config.num_layers
        return torch.stack([h[:n](hidden) for h in self.heads], dim=-2)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        if self.config.shared_lm_head:
            if lm_head is None:
                raise ValueError("these Medusa heads share the backbone's lm_head: pass it")
            # One projection for all K heads: the lm_head weight is read once.
            if self.draft_vocab is not None:
                weight = cast(torch.Tensor, lm_head.weight)
                return self._draft_logits(self.blocks(hidden), weight, getattr(lm_head, "bias", None))
            return lm_head(self.blocks(hidden))
        if self.draft_vocab is not None:
            n = self.config.num_layers
            return torch.stack(
                [self._draft_logits(h[:n](hidden), cast(torch.Tensor, h[n].weight), None) for h in self.heads], dim=-2
            )
        return torch.stack([h(hidden) for h in self.heads], dim=-2)


class HydraHeads(_DraftProjection):
    """K sequentially dependent heads (Hydra, Ankner et al. 2024, arXiv 2402.05109, its MLP form).

    Head k (0-based) predicts the same token as Medusa head k (depth k+1 of the tree, k+2
    positions past the last cached token) but reads, besides the last hidden state ``h``, the
    embeddings of the k+1 tokens on the path to that node: the root (the backbone's own next
    token) and the drafts of depths 1..k. Its first layer is ``h + SiLU(W_k [h; e_0; ..; e_k] + b_k)``
    (zero-initialised: a fresh head is the identity, as a fresh Medusa head is), then
    ``num_layers - 1`` residual blocks, then the shared ``lm_head`` (with the draft vocabulary, if
    any). A tree is therefore drafted level by level: depth d's candidates need their paths.

    The path embeddings are the backbone's input embeddings. With a draft vocabulary, a path token
    outside it reads a zero embedding (training does the same), so an exported graph holds only
    the draft rows of the embedding table.

    ``forward(hidden [N, H], path_ids [N, K], path_len [N], lm_head, embed) -> logits [N, V]``:
    row n runs head ``path_len[n] - 1`` on the first ``path_len[n]`` tokens of its path (the rest
    of the row is ignored), so one call may mix depths (the batch engine's sequences).
    """

    def __init__(self, config: HeadsConfig):
        super().__init__()
        if config.kind != "hydra":
            raise ValueError(f"HydraHeads needs a config of kind 'hydra', got {config.kind!r}")
        if not config.shared_lm_head:
            raise ValueError("Hydra heads share the backbone's lm_head")
        if config.num_layers < 1:
            raise ValueError("Hydra heads need num_layers >= 1 (the input layer)")
        self.config = config
        H = config.hidden_size
        for k in range(config.num_heads):
            head = nn.Module()
            head.input = nn.Linear((k + 2) * H, H)
            nn.init.zeros_(head.input.weight)
            nn.init.zeros_(head.input.bias)
            head.blocks = nn.Sequential(*[ResBlock(H) for _ in range(config.num_layers - 1)])
            self.add_module(str(k), head)
        self.register_buffer(DRAFT_VOCAB_KEY, None)
        if config.draft_vocab_size:
            raise ValueError("build the heads with draft_vocab_size=0, then call set_draft_vocab (load_heads does)")

    @property
    def heads(self) -> list[nn.Module]:
        return [cast(nn.Module, self._modules[str(k)]) for k in range(self.config.num_heads)]

    def _embed_rows(self, embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(table, map): the embedding rows a path token reads, and token id -> row (None: the
        table is ``embed`` itself). With a draft vocabulary the table is its rows plus a zero row
        that every other token maps to (kept between calls outside tracing, like the projection)."""
        ids = self.draft_vocab
        if ids is None:
            return embed, None
        tracing = torch.jit.is_tracing()
        c = None if tracing else self.__dict__.get("_embed_rows_cache")
        if not (c and c[0] is embed and c[1] == embed._version and c[2] is ids and c[3] == ids._version):
            table = torch.cat([embed.index_select(0, ids), embed.new_zeros(1, embed.shape[1])])
            row = torch.full((embed.shape[0],), len(ids), dtype=torch.long, device=embed.device)
            row[ids] = torch.arange(len(ids), device=embed.device)
            c = (embed, embed._version, ids, ids._version, table, row)
            if not tracing:
                self.__dict__["_embed_rows_cache"] = c
        return c[4], c[5]

    def path_embeddings(self, path_ids: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """[..., L] token ids -> [..., L, H] (zero outside the draft vocabulary)."""
        table, row = self._embed_rows(embed)
        return F.embedding(path_ids if row is None else row[path_ids], table)

    def blocks(self, hidden: torch.Tensor, path_ids: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Every head before its projection, head k on the first k+1 path tokens:
        hidden [N, H], path_ids [N, K] -> [N, K, H] (teacher forcing: the rows' true paths)."""
        e = self.path_embeddings(path_ids, embed)  # [N, K, H]
        outs = []
        for k, head in enumerate(self.heads):
            x = torch.cat([hidden, e[:, : k + 1].flatten(1)], dim=-1)
            head_input, head_blocks = cast(nn.Linear, head.input), cast(nn.Sequential, head.blocks)
            outs.append(head_blocks(hidden + F.silu(head_input(x))))
        return torch.stack(outs, dim=-2)

    def project(self, x: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        if self.draft_vocab is not None:
            return self._draft_logits(x, cast(torch.Tensor, lm_head.weight), getattr(lm_head, "bias", None))
        return lm_head(x)

    def forward(self, hidden, path_ids, path_len, lm_head: nn.Module, embed: torch.Tensor) -> torch.Tensor:
        K = self.config.num_heads
        out = self.blocks(hidden, path_ids[:, :K], embed)  # [N, K, H]
        pick = F.one_hot((path_len - 1).clamp(0, K - 1), K).to(out.dtype)  # [N, K]
        return self.project((out * pick.unsqueeze(-1)).sum(1), lm_head)


def fresh_hydra_heads(num_heads: int, hidden_size: int, vocab_size: int, num_layers: int = 1) -> HydraHeads:
    """Untrained Hydra heads: every head is the identity (it predicts what lm_head does)."""
    return HydraHeads(HeadsConfig(num_heads, num_layers, hidden_size, vocab_size, True, kind="hydra")).eval()


# ---------------------------------------------------------------------------- loading

_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def heads_config_from_state_dict(sd: dict[str, torch.Tensor], source: str) -> HeadsConfig:
    """Infer head count, layers, hidden and vocabulary sizes from official-style keys."""
    heads: dict[int, dict[int, set[str]]] = {}
    for key in sd:
        m = _KEY.match(key)
        if not m:
            raise CheckpointError(
                f"{source}: unexpected key {key!r} (expected '{{head}}.{{layer}}.linear.weight' style keys)"
            )
        heads.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    if not heads:
        raise CheckpointError(f"{source}: holds no Medusa head tensors")
    num_heads = max(heads) + 1
    if sorted(heads) != list(range(num_heads)):
        raise CheckpointError(f"{source}: head indices {sorted(heads)} are not 0..{num_heads - 1}")
    layouts = set()
    for i, layers in heads.items():
        blocks = sorted(j for j, kinds in layers.items() if "linear.weight" in kinds)
        proj = sorted(j for j, kinds in layers.items() if kinds == {"weight"})
        if blocks != list(range(len(blocks))) or not blocks:
            raise CheckpointError(f"{source}: head {i} has residual blocks {blocks}, expected 0..n-1")
        for j in blocks:
            if "linear.bias" not in layers[j]:
                raise CheckpointError(
                    f"{source}: tensor {i}.{j}.linear.bias is missing (every residual block holds "
                    f"{i}.{j}.linear.weight and {i}.{j}.linear.bias): the checkpoint is incomplete"
                )
        if proj and proj != [len(blocks)]:
            raise CheckpointError(f"{source}: head {i} has a projection at layer {proj}, expected {len(blocks)}")
        layouts.add((len(blocks), bool(proj)))
    if len(layouts) != 1:
        raise CheckpointError(f"{source}: heads differ in layer count or projection: {sorted(layouts)}")
    ((num_layers, has_proj),) = layouts
    first = sd["0.0.linear.weight"]
    if first.ndim != 2:
        raise CheckpointError(f"{source}: tensor 0.0.linear.weight has shape {tuple(first.shape)}, expected [H, H]")
    hidden = first.shape[1]
    vocab = sd[f"0.{num_layers}.weight"].shape[0] if has_proj else -1
    for key, t in sd.items():
        m = _KEY.match(key)
        assert m is not None  # every key matched _KEY in the loop above
        kind = m.group(3)
        expect = {"linear.weight": (hidden, hidden), "linear.bias": (hidden,), "weight": (vocab, hidden)}[kind]
        if tuple(t.shape) != expect:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(t.shape)}, expected {expect}")
    return HeadsConfig(num_heads, num_layers, hidden, vocab, shared_lm_head=not has_proj)


def _read_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if k.startswith(prefix):
                    out[k[len(prefix) :]] = f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({e})") from None
    return out


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: a checkpoint must not be able to run code while loading.
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a state dict of name -> tensor, found {type(k).__name__} {k!r} -> {type(v).__name__}"
            )
    return sd


def _read_medusa2_folder(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(_read_safetensors(f, prefix="medusa_head."))
    if not sd:
        for f in sorted(folder.glob("*.bin")):
            sd.update({k[len("medusa_head.") :]: v for k, v in _read_pickle(f).items() if k.startswith("medusa_head.")})
    return sd


def load_heads(
    path: str | Path,
    hidden_size: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> MedusaHeads | HydraHeads:
    """Load heads from a file or folder in any supported layout (see module doc).

    ``hidden_size`` / ``vocab_size`` are the backbone's: a mismatch is a CheckpointError
    naming both shapes.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"Medusa heads not found: {p} does not exist")
    meta: dict = {}
    layout = ""
    kind = "medusa"  # "hydra": the medusa-trt layout's json says so
    if p.is_dir():
        if (p / HEADS_WEIGHTS).is_file():
            p = p / HEADS_WEIGHTS
        elif (p / "medusa_lm_head.safetensors").is_file():
            p = p / "medusa_lm_head.safetensors"
        elif (p / "medusa_lm_head.pt").is_file():
            p = p / "medusa_lm_head.pt"
        elif (p / "config.json").is_file():
            model_cfg = _read_json(p / "config.json")
            if "medusa_num_heads" not in model_cfg:
                raise CheckpointError(
                    f"{p}: a model folder without Medusa heads (config.json has no 'medusa_num_heads'); "
                    f"expected {HEADS_WEIGHTS}, medusa_lm_head.pt/.safetensors or a Medusa-2 model"
                )
            sd = _read_medusa2_folder(p)
            if not sd:
                raise CheckpointError(
                    f"{p}: config.json declares Medusa heads but no 'medusa_head.*' tensors were found"
                )
            layout = "medusa2-full-model"
        else:
            raise CheckpointError(
                f"{p}: no Medusa heads found (looked for {HEADS_WEIGHTS}, medusa_lm_head.safetensors, "
                "medusa_lm_head.pt, or config.json with medusa_num_heads)"
            )
    if not layout:
        if p.suffix == ".safetensors":
            sd = _read_safetensors(p)
            layout = "medusa-trt" if p.name == HEADS_WEIGHTS else "medusa1-safetensors"
            if p.name == HEADS_WEIGHTS and (p.parent / HEADS_CONFIG).is_file():
                stored = _read_json(p.parent / HEADS_CONFIG)
                meta = stored.get("meta", {})
                kind = stored.get("kind", "medusa")
                if kind not in HEAD_TYPES:
                    raise CheckpointError(f"{p.parent / HEADS_CONFIG}: unknown head kind {kind!r}")
        elif p.suffix in (".pt", ".bin", ".pth"):
            sd = _read_pickle(p)
            layout = "medusa1-pt"
        else:
            raise CheckpointError(f"{p}: unknown head checkpoint type {p.suffix!r} (expected .safetensors or .pt)")
    draft = sd.pop(DRAFT_VOCAB_KEY, None)
    if draft is not None and (draft.dim() != 1 or draft.dtype.is_floating_point):
        raise CheckpointError(
            f"{p}: '{DRAFT_VOCAB_KEY}' must be a 1-D integer tensor, got {draft.dtype} {tuple(draft.shape)}"
        )
    hydra = _hydra_heads(p, sd, hidden_size, vocab_size) if kind == "hydra" else None
    cfg = hydra.config if hydra is not None else heads_config_from_state_dict(sd, str(p))
    for key, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{p}: tensor {key} holds NaN or infinite values: the checkpoint is damaged or its "
                "training diverged; use another checkpoint"
            )
    if hydra is None:  # (Hydra heads' sizes were checked against the backbone's by _hydra_heads)
        if cfg.shared_lm_head:
            if vocab_size is None:
                raise CheckpointError(
                    f"{p}: heads share the backbone's lm_head; the backbone's vocabulary size is needed"
                )
            cfg.vocab_size = vocab_size
        if hidden_size is not None and cfg.hidden_size != hidden_size:
            raise CheckpointError(
                f"{p}: Medusa heads do not fit the backbone: head block weight is "
                f"[{cfg.hidden_size}, {cfg.hidden_size}] but the backbone's hidden size is {hidden_size} "
                f"(expected [{hidden_size}, {hidden_size}])"
            )
        if vocab_size is not None and cfg.vocab_size != vocab_size:
            raise CheckpointError(
                f"{p}: Medusa heads do not fit the backbone: head projection is [{cfg.vocab_size}, {cfg.hidden_size}] "
                f"but the backbone's lm_head is [{vocab_size}, {hidden_size or cfg.hidden_size}]"
            )
    cfg.meta = {**meta, "layout": layout, "source": str(Path(path))}
    heads: MedusaHeads | HydraHeads = hydra if hydra is not None else MedusaHeads(cfg)
    heads.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    if draft is not None:
        try:
            heads.set_draft_vocab(draft)
        except CheckpointError as e:
            raise CheckpointError(f"{p}: {e}") from None
    return heads.to(dtype).eval()


_HYDRA_KEY = re.compile(r"^(\d+)\.(input\.weight|input\.bias|blocks\.(\d+)\.linear\.(weight|bias))$")


def _hydra_heads(p: Path, sd: dict, hidden_size, vocab_size) -> HydraHeads:
    """Fresh Hydra heads shaped as the state dict ``sd`` (medusa-trt layout, kind "hydra"), every
    key and shape checked against them and the backbone's sizes; :func:`load_heads` fills them."""
    heads_seen: dict[int, set] = {}
    for key in sd:
        m = _HYDRA_KEY.match(key)
        if not m:
            raise CheckpointError(f"{p}: unexpected key {key!r} for Hydra heads ('{{k}}.input.weight' style keys)")
        heads_seen.setdefault(int(m.group(1)), set()).add(int(m.group(3)) if m.group(3) else -1)
    K = max(heads_seen, default=-1) + 1
    if K < 1 or sorted(heads_seen) != list(range(K)):
        raise CheckpointError(f"{p}: Hydra head indices {sorted(heads_seen)} are not 0..K-1")
    layers = {len(v) for v in heads_seen.values()}
    if len(layers) != 1:
        raise CheckpointError(f"{p}: Hydra heads differ in their block counts")
    first = sd.get("0.input.weight")
    if first is None or first.ndim != 2:
        shape = "missing" if first is None else f"of shape {tuple(first.shape)}"
        raise CheckpointError(f"{p}: Hydra tensor 0.input.weight is {shape}, expected [H, 2H]")
    H = first.shape[0]
    if hidden_size is not None and H != hidden_size:
        raise CheckpointError(
            f"{p}: Hydra heads do not fit the backbone: their hidden size is {H}, the backbone's {hidden_size}"
        )
    if vocab_size is None:
        raise CheckpointError(f"{p}: heads share the backbone's lm_head; the backbone's vocabulary size is needed")
    heads = HydraHeads(HeadsConfig(K, layers.pop(), H, vocab_size, True, kind="hydra"))
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items() if k != DRAFT_VOCAB_KEY}
    for key, t in sd.items():
        if key not in expected or tuple(t.shape) != expected[key]:
            raise CheckpointError(f"{p}: tensor {key} has shape {tuple(t.shape)}, expected {expected.get(key)}")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{p}: Hydra heads lack {missing[:3]} (the checkpoint is incomplete)")
    return heads


def first_heads(heads: MedusaHeads | HydraHeads, k: int) -> MedusaHeads | HydraHeads:
    """The first ``k`` of ``heads`` (same weights, draft vocabulary and provenance): a tree of depth
    ``<= k`` drafts the same tokens from them, and each heads call projects ``k`` rows instead of all
    (Medusa heads project every head in one call, whatever the tree reads)."""
    n = heads.config.num_heads
    if not 1 <= k <= n:
        raise CheckpointError(f"--num-heads {k}: these heads have {n} (keep between 1 and {n})")
    if k == n:
        return heads
    cfg = replace(
        heads.config, num_heads=k, draft_vocab_size=0, meta={**heads.config.meta, "kept_heads": f"{k} of {n}"}
    )
    out: MedusaHeads | HydraHeads = HydraHeads(cfg) if isinstance(heads, HydraHeads) else MedusaHeads(cfg)
    sd = {key: v for key, v in heads.state_dict().items() if key == DRAFT_VOCAB_KEY or int(key.split(".")[0]) < k}
    vocab = sd.pop(DRAFT_VOCAB_KEY, None)
    out.load_state_dict(sd, strict=False)
    missing = [key for key in out.state_dict() if key != DRAFT_VOCAB_KEY and key not in sd]
    if missing:
        raise CheckpointError(f"--num-heads {k}: weights missing for {missing[:3]}")
    if vocab is not None:
        out.set_draft_vocab(vocab)
    return out.to(next(heads.parameters()).dtype).eval()


FINGERPRINT_ROWS = 8  # rows of each weight the backbone's fingerprint reads, at an even stride


def backbone_fingerprint(model) -> str:
    """A short digest of the backbone heads are trained on (recorded in their meta as
    ``backbone_fingerprint``): ``FINGERPRINT_ROWS`` rows at an even stride of every weight, by
    name, rounded to float16, so the same checkpoint loaded in float32, float16 or bfloat16 gives
    the same digest and another model of the same sizes (another fine-tune, a merged LoRA, the
    base model) another. Heads draft from this model's hidden states through its lm_head: on
    another backbone they load and export alike, and their drafts are seldom accepted (the output
    stays exact, the speedup goes). Reads a few MB of a 7B model."""
    import hashlib

    digest = hashlib.sha256()
    for name, weight in sorted(model.named_parameters(), key=lambda item: item[0]):
        w = weight.detach()
        rows = w[:: max(1, w.shape[0] // FINGERPRINT_ROWS)][:FINGERPRINT_ROWS] if w.ndim else w
        digest.update(name.encode())
        digest.update(rows.to(torch.float16).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_heads(
    heads: MedusaHeads | HydraHeads, folder: str | Path, meta: dict | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``medusa_heads.safetensors`` + ``medusa_heads.json`` into ``folder``.

    ``dtype=torch.float16`` halves the file (the shipped heads; :func:`load_heads` upcasts).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().contiguous() if k == DRAFT_VOCAB_KEY else v.detach().to(dtype).contiguous()
        for k, v in heads.state_dict().items()
    }
    cfg = asdict(heads.config)
    cfg["meta"] = {**heads.config.meta, **(meta or {})}
    cfg["format_version"] = FORMAT_VERSION
    # each file whole or not at all (a temporary name, renamed), the config last: an interrupted save
    # leaves the previous heads, or new weights whose sizes load_heads checks against the config
    with atomic_path(folder / HEADS_WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "medusa-trt", "format_version": str(FORMAT_VERSION)})
    write_text_atomic(folder / HEADS_CONFIG, json.dumps(cfg, indent=2) + "\n")
    return folder


def fresh_heads(
    num_heads: int,
    hidden_size: int,
    vocab_size: int,
    num_layers: int = 1,
    shared_lm_head: bool = True,
    lm_head: nn.Module | None = None,
) -> MedusaHeads:
    """Untrained heads: every block is the identity, so head k predicts what lm_head does."""
    return MedusaHeads(
        HeadsConfig(num_heads, num_layers, hidden_size, vocab_size, shared_lm_head), lm_head=lm_head
    ).eval()
