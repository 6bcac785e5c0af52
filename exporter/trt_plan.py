"""Making the TensorRT build plan: optimization profiles for the artifact's two graphs (pure Python).

The plan file's format, and which profile takes a call, live in :mod:`runtime.plan` (the
runtime reads the plan); this module derives a plan from an artifact and the user's limits.

One plan drives every way of building an engine (``trtexec``, Polygraphy, the Python API
builder in :mod:`exporter.trt_build`) and the runtime (:mod:`runtime.trt_backend`), so the
three tools and the backend never disagree on a shape. No ``tensorrt`` import here.

A TensorRT profile gives every dynamic input a min/opt/max shape; kernels are tuned at
*opt* and valid for the whole box. The backbone (``model.onnx``) has three named axes,
and every input's shape is written in terms of them, so the couplings of the graph
contract hold by construction::

    input_ids, position_ids          [batch, new_tokens]
    tree_mask                        [batch, new_tokens, new_tokens]   follows new_tokens
    past_key_values.{i}.key|value    [batch, past_sequence, kv_heads, head_dim]

Profiles (one execution context each at run time):

    0 prefill  new_tokens 1..max_prompt       past_sequence 0..max_context-max_prompt
    1 verify   new_tokens 1..max_tree_nodes   past_sequence 1..max_context-max_tree_nodes
               (opt new_tokens = the tree's node count)
    2 decode   new_tokens 1                   past_sequence 1..max_context-1

In each profile ``max past + max new <= max_context``. A plain (one-token) step near the
end of the context has a cache longer than ``max_context - max_tree_nodes``; the verify
profile cannot take it without breaking that bound, hence the small ``decode`` profile,
which also gives plain greedy decoding (the speed baseline) kernels tuned for one token.

**The empty cache.** The first prefill has no cache: ``past_sequence = 0``. The graph
contract makes the whole cache visible to every new token (there is no mask over the
cache), so a 1-token dummy entry cannot be hidden by the mask: it would take part in
every softmax and change the logits. The prefill profile therefore uses ``min
past_sequence = 0``. TensorRT's API allows it (``IOptimizationProfile::setDimensions``
requires ``0 <= min``; empty tensors are supported) as long as every tensor address is
non-null, which the runtime guarantees (past tensors point into the preallocated cache).
If a TensorRT version rejects it at build time, the way out is a graph-contract change
(a cache-validity input), not a runtime trick; docs/tensorrt.md says so.

``heads.onnx`` has one dynamic axis: ``hidden_states [batch, hidden]``. Hydra heads add
``path_ids [batch, num_medusa_heads]`` and ``path_len [batch]``; their batch axis holds one row per
parent node at a depth, up to ``max_batch * max_tree_nodes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.artifact import HEADS_INPUTS, HYDRA_INPUTS, ArtifactConfig, portable_io
from runtime.plan import (
    BACKBONE_ENGINE,
    BATCH,
    DECODE,
    DEFAULT_WORKSPACE_MIB,
    HEADS_ENGINE,
    NEW,
    PAST,
    PAST_INPUT,
    PREFILL,
    SUPPORTED_DTYPES,
    VERIFY,
    BuildPlan,
    Graph,
    PlanError,
    Profile,
    Range,
)

DEFAULT_MAX_TREE_NODES = 64  # the official Medusa trees have 63 candidates + the root
DEFAULT_MAX_PROMPT = 512
DEFAULT_OPT_PROMPT = 128  # the prefill profile's opt: a typical prompt chunk
DEFAULT_OPT_CONTEXT = 256  # the verify / decode profiles' opt: a typical cache length


# ---------------------------------------------------------------------------- limits


@dataclass
class Limits:
    """What the user asks of the engine. ``None``: derived from the artifact."""

    max_batch: int = 1
    max_context: int | None = None  # None: the artifact's model.max_context
    max_prompt: int | None = None  # prefill chunk (longer prompts take several calls); None: min(512, max_context // 2)
    opt_prompt: int | None = None  # typical prompt chunk (prefill opt); None: min(128, max_prompt)
    max_tree_nodes: int | None = None  # None: max(tree nodes, min(64, max_context - 1))
    tree: str | None = None  # tree whose size is the verify opt; None: the artifact's default tree
    opt_context: int | None = None  # typical cache length (verify/decode opt); None: 256 where the ranges allow
    workspace_mib: int = DEFAULT_WORKSPACE_MIB  # builder workspace memory pool
    tf32: bool = False  # let TensorRT run float32 matmuls in TF32 (off: float32 stays float32)


# ---------------------------------------------------------------------------- making a plan


def backbone_input_dims(name: str, cfg: ArtifactConfig) -> list:
    """Dims of one ``model.onnx`` input in axis names (graph contract, exporter/step.py)."""
    m = cfg.model
    if name in ("input_ids", "position_ids"):
        return [BATCH, NEW]
    if name == "tree_mask":
        return [BATCH, NEW, NEW]
    if PAST_INPUT.match(name):
        return [BATCH, PAST, m.num_kv_heads, m.head_dim]
    raise PlanError(f"{cfg.backbone.file}: input {name!r} is not part of the graph contract (docs/graph_contract.md)")


def _contract_inputs(cfg: ArtifactConfig) -> list[str]:
    return portable_io(cfg.model.num_layers)[0]


def check_dynamic_axes(cfg: ArtifactConfig, graph: Graph) -> None:
    """Cross-check the plan's axes with the artifact's named dynamic axes, when it records them.

    The artifact names each tensor's dynamic axes (``{"tree_mask": ["batch", "new", "new"]}``).
    One artifact name used for two different plan axes (say the cache length and the
    new-token count) means the exported graph assumes they are equal: refused here, not
    at run time. Two names for one plan axis only make the graph more general: accepted.
    """
    spec = cfg.backbone if graph.onnx == cfg.backbone.file else cfg.heads
    seen: dict[str, tuple[str, str]] = {}  # artifact axis name -> (plan axis, first input using it)
    for name, names in (spec.dynamic_axes or {}).items():
        if name not in graph.inputs:
            continue  # outputs: their axes follow from the inputs'
        dims = graph.inputs[name]
        dynamic = [d for d in dims if isinstance(d, str)]
        if len(names) == len(dims):  # names for every dim: keep those of the dynamic ones
            names = [n for n, d in zip(names, dims) if isinstance(d, str)]
        if len(names) != len(dynamic):
            raise PlanError(
                f"{spec.file}: input {name} has dynamic axes {list(names)} in medusa_config.json, "
                f"expected {len(dynamic)} ({', '.join(dynamic)})"
            )
        for art, axis in zip(names, dynamic):
            first_axis, first_input = seen.setdefault(art, (axis, name))
            if first_axis != axis:
                raise PlanError(
                    f"{spec.file}: dynamic axis {art!r} is {axis} in input {name} but {first_axis} in input "
                    f"{first_input}: the graph ties two axes the graph contract keeps independent"
                )


def resolve_tree(cfg: ArtifactConfig, tree: str | None = None):
    """The tree the verify profile is tuned for: ``tree`` (a name or JSON file) or the artifact's default."""
    from runtime.tree import build_tree, load_tree

    heads = cfg.model.num_medusa_heads or None
    if tree is not None:
        return load_tree(tree, num_heads=heads)
    if cfg.default_tree_paths:
        return build_tree(cfg.default_tree_paths, name=cfg.default_tree, num_heads=heads)
    return load_tree(cfg.default_tree, num_heads=heads)


def make_plan(cfg: ArtifactConfig, limits: Limits | None = None) -> BuildPlan:
    """The build plan for ``cfg`` under ``limits``; PlanError naming the limit that does not fit."""
    lim = limits or Limits()
    m = cfg.model
    if cfg.flavour != "portable":
        raise PlanError(
            f"this artifact holds the {cfg.flavour} graph (ONNX Runtime's com.microsoft fused ops), which TensorRT's "
            "ONNX parser does not take: re-export it for TensorRT with medusa-export ... --graph portable"
        )
    if cfg.dtype not in SUPPORTED_DTYPES:
        raise PlanError(f"artifact dtype {cfg.dtype!r}: TensorRT plans support {', '.join(SUPPORTED_DTYPES)}")
    if list(cfg.backbone.inputs) != _contract_inputs(cfg):
        raise PlanError(
            f"{cfg.backbone.file}: inputs {cfg.backbone.inputs[:4]}... do not follow the graph contract "
            f"(expected input_ids, position_ids, tree_mask, then past_key_values.{{i}}.key|value for {m.num_layers} layers)"
        )
    hydra = m.medusa_head_type == "hydra"
    expected_heads = list(HYDRA_INPUTS if hydra else HEADS_INPUTS)
    if list(cfg.heads.inputs) != expected_heads:
        raise PlanError(f"{cfg.heads.file}: inputs {cfg.heads.inputs}, expected {expected_heads}")
    _positive("max_batch", lim.max_batch)
    if lim.opt_prompt is not None:
        _positive("opt_prompt", lim.opt_prompt)
    if lim.opt_context is not None:
        _positive("opt_context", lim.opt_context)
    _positive("workspace_mib", lim.workspace_mib)

    ctx = m.max_context if lim.max_context is None else lim.max_context
    if not 2 <= ctx <= m.max_context:
        raise PlanError(f"max_context must lie in [2, {m.max_context}] (the artifact's context), got {ctx}")
    max_prompt = min(DEFAULT_MAX_PROMPT, max(1, ctx // 2)) if lim.max_prompt is None else lim.max_prompt
    if not 1 <= max_prompt <= ctx - 1:
        raise PlanError(f"max_prompt must lie in [1, max_context - 1 = {ctx - 1}], got {max_prompt}")
    t = resolve_tree(cfg, lim.tree)
    tree_name, nodes = t.name, t.num_nodes
    max_tree = lim.max_tree_nodes
    if max_tree is None:  # room for the official 64-node trees, within the context
        max_tree = max(nodes, min(DEFAULT_MAX_TREE_NODES, ctx - 1))
    if max_tree < nodes:
        raise PlanError(f"max_tree_nodes {max_tree} is smaller than tree {tree_name!r} ({nodes} nodes with the root)")
    if max_tree > ctx - 1:
        raise PlanError(
            f"max_tree_nodes {max_tree} leaves no room for the cache: it must be at most max_context - 1 = {ctx - 1}"
        )

    # an opt value the user gives must lie in its range (trtexec would refuse it only at build);
    # the defaults shrink to fit a small context
    if lim.opt_prompt is not None and lim.opt_prompt > max_prompt:
        raise PlanError(f"opt_prompt must be at most max_prompt = {max_prompt}, got {lim.opt_prompt}")
    if lim.opt_context is not None and lim.opt_context > ctx - max_tree:
        raise PlanError(
            f"opt_context must be at most max_context - max_tree_nodes = {ctx - max_tree} (the verify profile's "
            f"cache range), got {lim.opt_context}"
        )
    opt_prompt = min(DEFAULT_OPT_PROMPT, max_prompt) if lim.opt_prompt is None else lim.opt_prompt
    opt_context = DEFAULT_OPT_CONTEXT if lim.opt_context is None else lim.opt_context
    batch = Range(1, 1, lim.max_batch)

    def typical(hi: int) -> Range:  # a cache of 1..hi tokens, tuned at the typical length
        return Range(1, min(opt_context, hi), hi)

    profiles = [
        Profile(
            PREFILL,
            {
                BATCH: batch,
                NEW: Range(1, opt_prompt, max_prompt),
                PAST: Range(0, 0, ctx - max_prompt),
            },
        ),
        Profile(VERIFY, {BATCH: batch, NEW: Range(1, nodes, max_tree), PAST: typical(ctx - max_tree)}),
        Profile(DECODE, {BATCH: batch, NEW: Range(1, 1, 1), PAST: typical(ctx - 1)}),
    ]
    backbone = Graph(
        onnx=cfg.backbone.file,
        engine=BACKBONE_ENGINE,
        inputs={name: backbone_input_dims(name, cfg) for name in cfg.backbone.inputs},
        profiles=profiles,
    )
    if hydra:  # one row per parent at a depth: up to a tree's nodes per sequence
        heads = Graph(
            onnx=cfg.heads.file,
            engine=HEADS_ENGINE,
            inputs={
                HYDRA_INPUTS[0]: [BATCH, m.hidden_size],
                HYDRA_INPUTS[1]: [BATCH, m.num_medusa_heads],
                HYDRA_INPUTS[2]: [BATCH],
            },
            profiles=[Profile("heads", {BATCH: Range(1, 1, lim.max_batch * max_tree)})],
        )
    else:
        heads = Graph(
            onnx=cfg.heads.file,
            engine=HEADS_ENGINE,
            inputs={HEADS_INPUTS[0]: [BATCH, m.hidden_size]},
            profiles=[Profile("heads", {BATCH: batch})],
        )
    check_dynamic_axes(cfg, backbone)
    check_dynamic_axes(cfg, heads)
    plan = BuildPlan(
        dtype=cfg.dtype,
        num_layers=m.num_layers,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        hidden_size=m.hidden_size,
        vocab_size=m.vocab_size,
        num_medusa_heads=m.num_medusa_heads,
        max_batch=lim.max_batch,
        max_context=ctx,
        tree=tree_name,
        tree_nodes=nodes,
        backbone=backbone,
        heads=heads,
        workspace_mib=lim.workspace_mib,
        tf32=lim.tf32,
    )
    plan.check()
    return plan


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")
