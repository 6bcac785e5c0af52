"""``medusa-export``: a Hugging Face model + Medusa heads -> an ONNX artifact folder.

Also dispatches ``medusa-export trtexec ...`` and ``medusa-export build-engine ...`` to
:mod:`exporter.trt_cli` (TensorRT recipes for an artifact that already exists).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from pathlib import Path

from runtime.clihelp import HelpFormatter, field_default
from runtime.errors import MedusaError, require_extra, run_cli, sigterm_as_interrupt
from runtime.log import add_verbosity_args, cli_logging, verbosity
from runtime.paths import not_a_file

SHIPPED_HEADS = Path(__file__).resolve().parent / "shipped_heads"
SHIPPED_DATASTORE = Path(__file__).resolve().parent / "shipped_datastore"
EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")  # the [export] extra
# default trees for the embedded model with its shipped heads (medusa-train select-tree on the fused graph's profile)
SHIPPED_TREE = "smollm2_ort_cpu"
SHIPPED_TREE_QUANTIZED = "chain_1"
# exact sampling with the shipped heads: a chain (measured on 8 Alpaca prompts at temperature 0.7, with
# lookup: 1.21x over plain sampling with chain_1, 0.98x with the 2-sibling smollm2_ort_cpu)
SHIPPED_SAMPLING_TREE = "chain_1"
# the Hydra heads shipped beside them (issue 13; `--heads exporter/shipped_heads/smollm2-135m-hydra`)
# and the tree select-tree chose for them on the fused graph's profile (a heads call per depth)
SHIPPED_HYDRA = "smollm2-135m-hydra"
SHIPPED_HYDRA_TREE = "smollm2_hydra_ort_cpu"
MAX_FRESH_HEADS = 64  # a tree is at most this deep in practice (5); more heads only cost memory
STALE = 3  # --if-changed --check: the exit status when OUT is not current

DESCRIPTION = """\
Export a Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3; the embedded default
smollm2-135m is a Llama) with its Medusa heads into an artifact folder that ONNX
Runtime runs and that TensorRT (trtexec or the builder API) turns into engines.

The folder holds:
  model.onnx   backbone step, one graph for prefill, decode and tree verification.
               --graph fused (the default; ONNX Runtime): the cache is one buffer updated in
               place, in: input_ids, position_ids, tree_mask, cache_lengths, num_logits and
               past_key_values.{i}.key|value [batch, kv_heads, capacity, head_dim]; out: the
               last num_logits rows' logits, hidden_states and the buffers (float32 graphs
               also screen the lm_head in int8 for greedy steps: the same tokens).
               --graph portable (TensorRT): in: input_ids int64 [batch, new_tokens],
               position_ids int64 [batch, new_tokens], tree_mask bool [batch, new_tokens,
               new_tokens] (True = may attend; the cache is always visible),
               past_key_values.{i}.key|value [batch, past_sequence, kv_heads, head_dim];
               out: logits [batch, new_tokens, vocab], hidden_states [batch, new_tokens,
               hidden], present.{i}.key|value [batch, new_tokens, kv_heads, head_dim] (new
               entries only); its dynamic axes batch, new_tokens and past_sequence are the
               axes of a TensorRT optimization profile.
  heads.onnx   Medusa heads on one hidden state: hidden_states [batch, hidden]
               -> medusa_logits [batch, heads, vocab]
  heads_int8.onnx, heads_int8_first.onnx   float32 exports: int8 heads (and the first head
               alone) for ONNX Runtime on the CPU
  batch.onnx, fold.onnx   fused float exports: several sequences a call (medusa-run serve)
  datastore.npz   drafts from the model's own answers (smollm2-135m: the shipped one)
  tokenizer.json, tokenizer_config.json, chat_template.jinja, medusa_config.json

Precision is baked into the ONNX file (--dtype float16; TensorRT 11 has no --fp16 builder
flag). The mask is boolean: no -3.4e38 constants that overflow in fp16. Exact input and
output names, shapes and axes: docs/graph_contract.md.

Every export is validated (ONNX Runtime against PyTorch) before the folder appears;
a failed or interrupted export leaves nothing behind.
"""

EPILOG = """\
examples:
  medusa-export smollm2-135m -o artifacts/smollm2                  (shipped heads)
  medusa-export smollm2-135m --fresh-heads 4 -o /tmp/demo          (untrained heads, a demo)
  medusa-export ./Qwen2-0.5B --heads ./medusa_lm_head.safetensors -o out --dtype float16
  medusa-export trtexec out        TensorRT plan + trtexec commands for an artifact
  medusa-export build-engine out   build the TensorRT engines with the Python API
"""


def build_parser() -> argparse.ArgumentParser:
    from exporter.export import GRAPHS, PRECISION_DTYPE, ExportOptions  # no torch or onnx at import

    def default(name: str):  # a flag filling an ExportOptions field takes that field's default
        return field_default(ExportOptions, name)

    p = argparse.ArgumentParser(
        prog="medusa-export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL", help="local Hugging Face model folder (config.json + *.safetensors), or smollm2-135m"
    )
    heads = p.add_mutually_exclusive_group()
    heads.add_argument(
        "--heads",
        metavar="HEADS",
        help="Medusa heads: a medusa-trt folder (medusa_heads.safetensors), a Medusa-1 "
        "medusa_lm_head.pt/.safetensors, or a Medusa-2 model folder. Default for "
        "smollm2-135m: the heads shipped with medusa-trt",
    )
    heads.add_argument(
        "--fresh-heads",
        metavar="K",
        type=int,
        help="K untrained identity heads (each predicts what the backbone would): tests and demos",
    )
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="artifact folder to create")
    p.add_argument(
        "--graph",
        choices=GRAPHS,
        default=default("graph"),
        help="fused: ONNX Runtime's fused kernels (GroupQueryAttention with the tree mask, fused "
        "norms and projections) and a KV cache updated in place, for ONNX Runtime; portable: "
        "standard ONNX ops only, for TensorRT (trtexec / build-engine)",
    )
    p.add_argument(
        "--precision",
        choices=tuple(PRECISION_DTYPE),
        default=default("precision"),
        help="backbone weights: fp32 (default), fp16, or int8 / int4 weight-only (ONNX Runtime "
        "MatMulNBits, fused graph only; Medusa stays lossless against plain decoding on the same "
        "quantized graph)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default=default("dtype"),
        help="float dtype of weights, logits, hidden states and the KV cache (default: float32, or what "
        "--precision implies; --precision fp16 is the same as --dtype float16)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=default("opset"),
        metavar="N",
        help="ONNX opset of the portable graph, 17-20 (the fused graph is always opset 21)",
    )
    p.add_argument(
        "--external-data-threshold-mb",
        type=float,
        default=default("external_data_threshold_mb"),
        metavar="N",
        help="store a graph's weights in <file>.onnx.data when they exceed N MB (protobuf cannot hold more than 2 GB)",
    )
    p.add_argument(
        "--tree",
        metavar="NAME",
        default=default("tree"),
        help="default tree recorded for the runtime (a name in tree_configs or a JSON file); default: "
        f"{SHIPPED_TREE} for smollm2-135m with its shipped heads ({SHIPPED_TREE_QUANTIZED} at int8/int4), "
        "else cpu_8, or chain_K with fewer than 4 heads (int8/int4: chain_1)",
    )
    p.add_argument(
        "--sampling-tree",
        metavar="NAME",
        default=default("sampling_tree"),
        help="the tree exact sampling (temperature > 0) uses when none is given: at temperature > 0 a "
        "draft is accepted with the backbone's probability of its token, so smaller trees pay; "
        f"default: {SHIPPED_SAMPLING_TREE} for smollm2-135m with its shipped heads, else the default tree",
    )
    p.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        default=default("max_context"),
        help="longest context the runtime sizes its KV cache for (default: the model's max_position_embeddings)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--if-changed",
        action="store_true",
        help="keep OUT when it holds what this command would write (made by the same medusa-trt code, with the same "
        "options, from the same model, heads and datastore files: the recipe the export records); else export, "
        "replacing OUT as --force does (scripts/main.sh exports this way)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --if-changed: only say whether OUT is current; exit status 0 if it is, 3 if an export would "
        "write or replace it (nothing is written)",
    )
    p.add_argument(
        "--no-heads-int8",
        action="store_true",
        help="do not write heads_int8.onnx nor heads_int8_first.onnx (int8 heads, and the first head alone "
        "for depth-1 trees, for ONNX Runtime on the CPU; the heads only propose candidates, so int8 never "
        "changes the output; TensorRT uses heads.onnx)",
    )
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        metavar="K",
        help="keep only the first K of the heads (trees up to depth K): each heads call then projects K rows "
        "instead of all (on a CPU the default tree of the shipped heads reads one)",
    )
    p.add_argument(
        "--datastore",
        default=None,
        metavar="FILE|none",
        help="a datastore.npz (medusa-train datastore: the model's own answers, drafts where the context "
        "repeats nothing) to copy into the artifact; smollm2-135m: the one shipped with medusa-trt; none: no datastore",
    )
    p.add_argument(
        "--no-batch-graph",
        action="store_true",
        help="do not write batch.onnx (fused float graphs: several sequences per engine call, used by "
        "`medusa-run serve`; its weights are model.onnx's own data file, so it adds ~0.2 MB)",
    )
    p.add_argument(
        "--no-lm-head-screen",
        action="store_true",
        help="no int8 screen of the lm_head in the fused float32 graph (greedy steps then compute float logits: "
        "the same tokens, slower; the screen adds ~30 MB of int8 weights for SmolLM2, and a float copy of an untied "
        "lm_head)",
    )
    p.add_argument(
        "--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check (not recommended)"
    )
    add_verbosity_args(p)
    return p


def _default_heads(model_arg: str) -> Path:
    from exporter.models import DEFAULT_MODEL

    if model_arg == DEFAULT_MODEL:
        shipped = SHIPPED_HEADS / DEFAULT_MODEL
        if shipped.is_dir() and any(shipped.iterdir()):
            return shipped
        raise MedusaError(
            f"no Medusa heads given, and the heads shipped for {DEFAULT_MODEL} are not installed "
            f"({shipped} is missing): pass --heads PATH, or --fresh-heads K for untrained heads"
        )
    raise MedusaError(
        f"no Medusa heads given for {model_arg}: pass --heads PATH (a medusa-trt heads folder, "
        "medusa_lm_head.pt/.safetensors, or a Medusa-2 model folder), or --fresh-heads K for untrained heads"
    )


def _shipped_heads_of_default_model(args: argparse.Namespace) -> bool:
    """The embedded default model with the heads shipped for it (implied, or passed as --heads):
    the trees measured for exactly these heads apply."""
    from exporter.models import DEFAULT_MODEL

    if args.model != DEFAULT_MODEL or args.fresh_heads is not None:
        return False
    if args.heads is None:
        return True
    try:
        return Path(args.heads).expanduser().resolve() == (SHIPPED_HEADS / DEFAULT_MODEL).resolve()
    except OSError:
        return False


def _shipped_hydra_heads(args: argparse.Namespace) -> bool:
    from exporter.models import DEFAULT_MODEL

    if args.model != DEFAULT_MODEL or args.heads is None:
        return False
    try:
        return Path(args.heads).expanduser().resolve() == (SHIPPED_HEADS / SHIPPED_HYDRA).resolve()
    except OSError:
        return False


def default_trees(args: argparse.Namespace, precision: str | None) -> tuple[str | None, str | None]:
    """(tree, sampling tree) to record: ``--tree`` / ``--sampling-tree`` when given; for the embedded
    model with its shipped heads the trees measured for them (the tree medusa-train select-tree chose
    on the fused fp32 graph's cost profile, chain_1 on int8/int4 graphs and for exact sampling);
    else None (the exporter's generic default: cpu_8, or chain_K for fewer heads)."""
    tree, sampling_tree = args.tree, args.sampling_tree
    if _shipped_heads_of_default_model(args):
        if tree is None:
            tree = SHIPPED_TREE_QUANTIZED if precision in ("int8", "int4") else SHIPPED_TREE
        if sampling_tree is None:
            sampling_tree = SHIPPED_SAMPLING_TREE
    elif _shipped_hydra_heads(args):
        if tree is None:
            tree = SHIPPED_TREE_QUANTIZED if precision in ("int8", "int4") else SHIPPED_HYDRA_TREE
        if sampling_tree is None:
            sampling_tree = SHIPPED_SAMPLING_TREE
    return tree, sampling_tree


def default_datastore(args: argparse.Namespace) -> str | None:
    """``--datastore``: the file given; ``none``: none; unset: the datastore shipped for the embedded
    model (built from the same self-distilled answers as its heads; any heads may use it), else none."""
    from exporter.models import DEFAULT_MODEL

    if args.datastore is not None:
        if args.datastore.lower() == "none":
            return None
        if not Path(args.datastore).expanduser().is_file():
            why = not_a_file(args.datastore, missing="no such file")
            raise MedusaError(f"--datastore {args.datastore}: {why} (medusa-train datastore writes one)")
        if not zipfile.is_zipfile(Path(args.datastore).expanduser()):
            raise MedusaError(
                f"--datastore {args.datastore} is not a datastore.npz (a numpy archive; medusa-train datastore writes one)"
            )
        from runtime.datastore import Datastore

        Datastore.load(Path(args.datastore).expanduser())  # a numpy archive that is no datastore: named now, not
        return str(Path(args.datastore).expanduser())  # after the model loaded and the graphs were written
    shipped = SHIPPED_DATASTORE / DEFAULT_MODEL / "datastore.npz"
    return str(shipped) if args.model == DEFAULT_MODEL and shipped.is_file() else None


def export_options(args: argparse.Namespace):
    """The ExportOptions that ``medusa-export`` arguments ask for (trees: see default_trees)."""
    from exporter.export import ExportOptions

    return ExportOptions(
        dtype=args.dtype,
        graph=args.graph,
        precision=args.precision,
        opset=args.opset,
        external_data_threshold_mb=args.external_data_threshold_mb,
        tree=args.tree,
        sampling_tree=args.sampling_tree,
        max_context=args.max_context,
        force=args.force,
        validate=not args.no_validate,
        heads_int8=not args.no_heads_int8,
        batch_graph=not args.no_batch_graph,
        lm_head_screen=not args.no_lm_head_screen,
        source_model=args.model,
        datastore=default_datastore(args),
    )


def preflight(folder: Path, options):
    """What a model folder's small files tell, before minutes of loading: a supported architecture,
    weights, a tokenizer, and a ``--max-context`` the model holds. Returns the tokenizer."""
    from exporter.export import fitting_context
    from exporter.models import cause, check_architecture, check_tokenizer, check_weights

    check_architecture(folder)
    check_weights(folder)
    tokenizer = check_tokenizer(folder)
    if options.max_context is not None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder))
        except Exception as e:  # a config transformers cannot read: the load would say the same, later
            raise MedusaError(f"cannot read {folder / 'config.json'}: {cause(e)}") from None
        fitting_context(options.max_context, config)
    return tokenizer


def run(args: argparse.Namespace) -> Path:
    import torch

    from exporter.export import check_options, check_out_dir, export_artifact, progress
    from exporter.heads import first_heads, fresh_heads, load_heads
    from exporter.models import DEFAULT_MODEL, cause, load_backbone, resolve_model, transformers_bars

    options = export_options(args)
    check_options(options)
    options.tree, options.sampling_tree = default_trees(args, options.precision)
    tokenizer = None  # preflight's, kept for the load
    if args.model != DEFAULT_MODEL:  # a missing or non-model folder is named before anything else (the heads)
        tokenizer = preflight(resolve_model(args.model), options)
    out = Path(args.output).expanduser().absolute()
    if args.check and not args.if_changed:
        raise MedusaError("--check says whether OUT is current: give it with --if-changed")
    if not args.if_changed:
        check_out_dir(out, args.force)  # before minutes of work
    if args.fresh_heads is not None and not 1 <= args.fresh_heads <= MAX_FRESH_HEADS:
        raise MedusaError(f"--fresh-heads needs at least 1 head and at most {MAX_FRESH_HEADS}, got {args.fresh_heads}")
    if args.num_heads is not None and args.num_heads < 1:
        raise MedusaError(f"--num-heads must be at least 1, got {args.num_heads}")
    heads_path = None if args.fresh_heads is not None else (args.heads or _default_heads(args.model))
    if heads_path is not None and not Path(heads_path).expanduser().exists():  # before the backbone loads
        raise MedusaError(f"Medusa heads not found: {heads_path} does not exist")
    from runtime import checks

    for name in (options.tree, options.sampling_tree):  # a tree's name or file: checked before the backbone loads
        if isinstance(name, str) and not name.lstrip().startswith("["):
            checks.tree(name, None, None)
    from exporter.recipe import export_recipe, why_not_current

    # recorded by every export, so that a later --if-changed can keep it (~2 s: no weights are hashed)
    recipe = export_recipe(options, resolve_model(args.model), heads_path,
                           {"num_heads": args.num_heads, "fresh_heads": args.fresh_heads})  # fmt: skip
    if args.if_changed:
        with progress("comparing OUT with what this export would write"):
            reasons = why_not_current(out, recipe) if os.path.lexists(out) else []
        if os.path.lexists(out) and not reasons:
            args.kept = True
            return out
        if args.check:
            args.stale = reasons or ["it does not exist"]
            return out
        if reasons:
            args.replaced = reasons
        check_out_dir(out, True)  # a stale artifact is replaced; a folder holding anything else never is
        options.force = True

    dtype = {"float32": torch.float32, "float16": torch.float16}[options.dtype]
    with progress(f"loading {args.model} ({options.dtype})"), transformers_bars(False):
        try:
            model, tokenizer, folder = load_backbone(args.model, dtype=options.dtype, tokenizer=tokenizer)
        except MedusaError:
            raise
        except Exception as e:  # a folder transformers cannot read (truncated weights, a bad config): the user's
            raise MedusaError(f"cannot load the model {args.model}: {cause(e)}") from None
    options.source_model_path = str(Path(folder).resolve())
    c = model.config
    with progress("loading the Medusa heads" if heads_path else f"creating {args.fresh_heads} fresh heads"):
        if heads_path is not None:
            heads = load_heads(heads_path, hidden_size=c.hidden_size, vocab_size=c.vocab_size, dtype=dtype)
        else:
            heads = fresh_heads(args.fresh_heads, c.hidden_size, c.vocab_size).to(dtype)
            heads.config.meta = {"layout": "fresh-identity", "source": f"--fresh-heads {args.fresh_heads}"}
        if args.num_heads is not None:
            heads = first_heads(heads, args.num_heads)
    try:
        return export_artifact(model, heads, out, options, tokenizer=tokenizer, recipe=recipe)
    except OSError as e:  # a full disk, a folder taken away: nothing is left (export_artifact cleans up)
        raise MedusaError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None


def _summary(out: Path, seconds: float, args: argparse.Namespace | None = None) -> str:
    import json

    stale = getattr(args, "stale", None)
    if stale:
        return f"{out} is not current: {'; '.join(stale)} (an export without --check would write it)"
    if getattr(args, "kept", False):
        return (
            f"{out} is current (this medusa-trt's code, the same options, model, heads and datastore files): "
            "kept as it is"
        )
    cfg = json.loads((out / "medusa_config.json").read_text())
    sizes = sorted(((p.stat().st_size, p.name) for p in out.iterdir() if p.is_file()), reverse=True)
    files = [
        f"{name} {size / 2**20:.1f} MiB" if size >= 2**20 else f"{name} {size / 2**10:.1f} KiB" for size, name in sizes
    ]
    lines = [f"artifact written to {out} in {seconds:.1f} s", "  files: " + ", ".join(files)]
    replaced = getattr(args, "replaced", None)
    if replaced:
        lines.insert(1, f"  replaced what was there: {'; '.join(replaced)}")
    val = cfg["provenance"].get("validation", {})
    if val.get("passed"):
        lines.append(
            f"  validation: passed ({val.get('checks', '?')} comparisons); max|diff| "
            + ", ".join(f"{k} {v:g}" for k, v in val["max_abs_diff"].items())
        )
    else:
        lines.append("  validation: skipped (--no-validate)")
    check = cfg["provenance"].get("quantization", {}).get("check")
    if check:
        lines.append(
            f"  {cfg.get('precision')} vs the float graph on {check['tokens']} tokens of {check['on']}: top-1 "
            f"agrees at {check['top1_agree']:.1%}, max|logits diff| {check['max_abs_logits']:.3g}"
        )
    flavour = cfg.get("flavour", "portable")
    nxt = f"medusa-run generate {out} PROMPT" if flavour == "fused" else f"medusa-export trtexec {out}"
    lines.append(
        f"  {flavour} graph, precision {cfg.get('precision', 'fp32')}, default tree {cfg['default_tree']}, "
        f"opset {cfg['opset']}; next: {nxt}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("trtexec", "build-engine"):
        from exporter.trt_cli import main as trt_main

        return trt_main(argv)
    code = run_cli("medusa-export", lambda: require_extra("medusa-export", "export", EXPORT_MODULES))
    if code:
        return code
    args = build_parser().parse_args(argv)
    t = time.perf_counter()
    # on a terminal the steps show with their times by default (minutes of work; -q hides them)
    level = verbosity(args) + (verbosity(args) == 0 and sys.stderr.isatty())
    # SIGTERM stops like Ctrl-C from the start (loading the model too), with the same one line and exit 143
    with cli_logging("medusa-export", level), sigterm_as_interrupt():
        code = run_cli(
            "medusa-export",
            lambda: print(_summary(run(args), time.perf_counter() - t, args)),
            interrupted="interrupted; nothing was written",
        )
    return STALE if code == 0 and getattr(args, "stale", None) else code


if __name__ == "__main__":
    sys.exit(main())
