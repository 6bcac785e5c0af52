"""``medusa-export trtexec`` and ``medusa-export build-engine``: TensorRT recipes from one plan.

``trtexec ARTIFACT`` writes, next to the artifact's ONNX files:

    trt_plan.json         the plan (profiles, engine names); the TensorRT backend reads it
    trtexec.sh            the exact trtexec commands that build model.engine and heads.engine
    polygraphy_check.sh   polygraphy run --onnxrt --trt, one comparison per profile
    trt_check_data.py     the Polygraphy data loaders those comparisons feed

and prints the profiles and where the scripts are (``-v``: the commands too; a backbone's
full trtexec command line runs to tens of KB of shape flags). ``build-engine ARTIFACT`` builds the same engines
through the TensorRT Python API (:mod:`exporter.trt_build`).

The command builders are pure functions of the plan, and :func:`parse_trtexec` /
:func:`parse_polygraphy` read a command line back (as trtexec and Polygraphy read it),
so tests check the commands against the plan without either tool installed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporter.trt_plan import Limits, make_plan, resolve_tree
from runtime.errors import run_cli, sigterm_as_interrupt
from runtime.log import add_verbosity_args, cli_logging, verbosity
from runtime.paths import write_text_atomic
from runtime.plan import DECODE, NEW, PAST, PLAN_FILE, PREFILL, VERIFY, BuildPlan, Graph, PlanError

TRTEXEC_SCRIPT = "trtexec.sh"
POLYGRAPHY_SCRIPT = "polygraphy_check.sh"
DATA_SCRIPT = "trt_check_data.py"
STAGED = ".partial"  # trtexec.sh builds each engine under this suffix, renamed once both are built
# polygraphy's own verbosity in the recipes: -qq shows PASSED/FAILED, the accuracy summary and warnings,
# not the thousands of lines of TensorRT's build log per profile (drop it to see them)
POLYGRAPHY_QUIET = "-qq"
# Polygraphy tolerances per artifact dtype: starting points, the decisive check is greedy equality
TOLERANCES = {"float32": (1e-3, 1e-3), "float16": (1e-1, 5e-2)}

Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _graph(plan: BuildPlan, which: str) -> Graph:
    if which not in ("backbone", "heads"):
        raise PlanError(f"unknown graph {which!r}: use backbone or heads")
    return plan.backbone if which == "backbone" else plan.heads


def _path(root: str | Path, name: str) -> str:
    return str(Path(root) / name)


# ---------------------------------------------------------------------------- trtexec


def _trtexec_shapes(shapes: Shapes, which: int) -> str:
    # trtexec: name:AxBxC pairs joined by commas (it splits a pair on the last ':')
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


def trtexec_command(
    plan: BuildPlan, which: str = "backbone", root: str | Path = ".", trtexec: str = "trtexec", staged: bool = False
) -> list[str]:
    """The trtexec command that builds ``which`` (backbone or heads) under ``plan`` (``staged``:
    into ``ENGINE.partial``, which trtexec.sh renames once both engines are built).

    Several profiles use trtexec's ``--profile=i`` followed *immediately* by that profile's
    ``--minShapes/--optShapes/--maxShapes`` (TensorRT >= 10.0; repeated shape flags without
    ``--profile`` are refused). ``--stronglyTyped`` makes TensorRT 10 take every precision
    from the ONNX file; TensorRT 11 is always strongly typed and accepts the flag as a no-op.
    """
    graph = _graph(plan, which)
    engine = _path(root, graph.engine + (STAGED if staged else ""))
    cmd = [trtexec, f"--onnx={_path(root, graph.onnx)}", f"--saveEngine={engine}", "--stronglyTyped"]
    for i, profile in enumerate(graph.profiles):
        shapes = graph.shapes(profile)
        cmd += [
            f"--profile={i}",
            f"--minShapes={_trtexec_shapes(shapes, 0)}",
            f"--optShapes={_trtexec_shapes(shapes, 1)}",
            f"--maxShapes={_trtexec_shapes(shapes, 2)}",
        ]
    cmd += [f"--timingCacheFile={_path(root, plan.timing_cache)}", f"--memPoolSize=workspace:{plan.workspace_mib}M"]
    if not plan.tf32:
        cmd.append("--noTF32")  # trtexec enables TF32 by default; Polygraphy and our builder do not
    cmd.append("--skipInference")
    return cmd


@dataclass
class TrtexecCommand:
    onnx: str = ""
    save_engine: str = ""
    profiles: list[Shapes] = field(default_factory=list)
    timing_cache: str = ""
    mem_pool: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)


def _shape_list(text: str, sep: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for pair in text.split(","):
        name, _, dims = pair.rpartition(":")
        if not name:
            raise PlanError(f"shape spec {pair!r} has no tensor name")
        out[name] = tuple(int(d) for d in dims.split(sep))
    return out


def parse_trtexec(command: str | list[str]) -> TrtexecCommand:
    """Read a trtexec command line in the form :func:`trtexec_command` writes (``--profile=i`` blocks
    in order, each directly followed by its min, opt and max shapes); stricter than trtexec."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    parsed = TrtexecCommand()
    args = [(a.partition("=")[0], a.partition("=")[2]) for a in argv[1:]]
    i = 0
    while i < len(args):
        key, value = args[i]
        if key == "--profile":
            index = int(value)
            if index != len(parsed.profiles):
                raise PlanError(f"--profile={index} out of order: expected --profile={len(parsed.profiles)}")
            block = dict(args[i + 1 : i + 4])
            if sorted(k for k, _ in args[i + 1 : i + 4]) != ["--maxShapes", "--minShapes", "--optShapes"]:
                raise PlanError(
                    f"--profile={index} must be followed directly by --minShapes, --optShapes and --maxShapes"
                )
            mins, opts, maxs = (_shape_list(block[k], "x") for k in ("--minShapes", "--optShapes", "--maxShapes"))
            if not (mins.keys() == opts.keys() == maxs.keys()):
                raise PlanError(f"--profile={index}: min/opt/max shapes name different tensors")
            parsed.profiles.append({n: (mins[n], opts[n], maxs[n]) for n in mins})
            i += 4
            continue
        if key in ("--minShapes", "--optShapes", "--maxShapes"):
            raise PlanError(f"{key} outside a --profile block (trtexec refuses several profiles without --profile)")
        if key == "--onnx":
            parsed.onnx = value
        elif key == "--saveEngine":
            parsed.save_engine = value
        elif key == "--timingCacheFile":
            parsed.timing_cache = value
        elif key == "--memPoolSize":
            parsed.mem_pool.update(dict(p.split(":", 1) for p in value.split(",")))
        elif value:
            raise PlanError(f"unexpected trtexec option {key}={value}")
        else:
            parsed.flags.add(key)
        i += 1
    return parsed


# ---------------------------------------------------------------------------- polygraphy


def _polygraphy_shapes(shapes: Shapes, which: int) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in s[which])}]" for name, s in shapes.items()]


def polygraphy_command(
    plan: BuildPlan, which: str = "backbone", profile: str | None = None, root: str | Path = "."
) -> list[str]:
    """``polygraphy run --onnxrt --trt`` comparing ONNX Runtime and TensorRT on one profile.

    Every profile of the graph is declared (repeated ``--trt-*-shapes``, one set per profile,
    so the engine equals the trtexec one); ``--optimization-profile`` picks the one the
    data loader ``trt_check_data.py:load_<profile>`` feeds.
    """
    graph = _graph(plan, which)
    name = profile or graph.profiles[0].name
    index = graph.profile_index(name)
    atol, rtol = TOLERANCES[plan.dtype]
    cmd = ["polygraphy", "run", _path(root, graph.onnx), POLYGRAPHY_QUIET, "--onnxrt", "--trt", "--strongly-typed"]
    for p in graph.profiles:  # Polygraphy pairs the n-th min, opt and max sets into profile n
        shapes = graph.shapes(p)
        cmd += ["--trt-min-shapes", *_polygraphy_shapes(shapes, 0)]
        cmd += ["--trt-opt-shapes", *_polygraphy_shapes(shapes, 1)]
        cmd += ["--trt-max-shapes", *_polygraphy_shapes(shapes, 2)]
    cache = _path(root, plan.timing_cache)
    cmd += [
        "--optimization-profile", str(index),
        "--data-loader-script", f"{_path(root, DATA_SCRIPT)}:load_{name}",
        "--load-timing-cache", cache,
        "--save-timing-cache", cache,
        "--pool-limit", f"workspace:{plan.workspace_mib}M",
    ]  # fmt: skip
    if plan.tf32:
        cmd.append("--tf32")
    cmd += ["--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    return cmd


@dataclass
class PolygraphyCommand:
    model: str = ""
    runners: list[str] = field(default_factory=list)
    profiles: list[Shapes] = field(default_factory=list)
    options: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)


_POLY_RUNNERS = ("--onnxrt", "--trt")
_POLY_FLAGS = ("--strongly-typed", "--tf32", POLYGRAPHY_QUIET)


def parse_polygraphy(command: str | list[str]) -> PolygraphyCommand:
    """Read a ``polygraphy run`` command: profiles pair the n-th min/opt/max shape sets."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] != ["polygraphy", "run"] or len(argv) < 3:
        raise PlanError(f"not a 'polygraphy run MODEL ...' command: {argv[:3]}")
    parsed = PolygraphyCommand(model=argv[2])
    shape_sets: dict[str, list[dict[str, tuple[int, ...]]]] = {"min": [], "opt": [], "max": []}
    i = 3
    while i < len(argv):
        key = argv[i]
        values = []
        i += 1
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if key in _POLY_RUNNERS:
            parsed.runners.append(key[2:])
        elif key in _POLY_FLAGS:
            parsed.flags.add(key)
        elif key in ("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes"):
            sets = {}
            for v in values:
                tensor, _, dims = v.rpartition(":")
                sets[tensor] = tuple(int(d) for d in dims.strip("[]").split(",") if d != "")
            shape_sets[key[len("--trt-") :].split("-")[0]].append(sets)
        elif values:
            parsed.options.setdefault(key, []).extend(values)
        else:
            raise PlanError(f"polygraphy option {key} without a value")
    if not len(shape_sets["min"]) == len(shape_sets["opt"]) == len(shape_sets["max"]):
        raise PlanError("polygraphy command: unequal numbers of --trt-min/opt/max-shapes sets")
    for mins, opts, maxs in zip(shape_sets["min"], shape_sets["opt"], shape_sets["max"]):
        if not (mins.keys() == opts.keys() == maxs.keys()):
            raise PlanError("polygraphy command: min/opt/max shape sets of one profile name different tensors")
        parsed.profiles.append({n: (mins[n], opts[n], maxs[n]) for n in mins})
    return parsed


# ---------------------------------------------------------------------------- data loaders


_DATA_TEMPLATE = '''"""Polygraphy data loaders for {backbone} and {heads}, written by medusa-export trtexec.

One function per TensorRT profile of trt_plan.json; every feed's shapes lie inside that
profile. The cache is random (both runners get the same feed). numpy only.
"""

import numpy as np

DTYPE = np.{dtype}
LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = {layers}, {kv_heads}, {head_dim}, {hidden}, {vocab}
PREFILL_TOKENS = {prefill_tokens}  # prefill opt new_tokens, on an empty cache
VERIFY_PAST, DECODE_PAST = {verify_past}, {decode_past}  # opt past_sequence of verify / decode
TREE = {tree!r}
TREE_MASK = {tree_mask}  # [nodes, nodes], root first
TREE_DEPTH = {tree_depth}
HYDRA_HEADS = {hydra_heads}  # Hydra heads' path width (0: Medusa heads, hidden_states alone)


def _feed(rng, past, mask, positions):
    n = len(positions)
    feed = {{
        "input_ids": rng.integers(0, VOCAB, size=(1, n), dtype=np.int64),
        "position_ids": np.asarray(positions, dtype=np.int64)[None],
        "tree_mask": np.asarray(mask, dtype=bool)[None],
    }}
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feed[f"past_key_values.{{i}}.{{kv}}"] = rng.standard_normal((1, past, KV_HEADS, HEAD_DIM)).astype(DTYPE)
    return feed


def load_{prefill}():
    n = PREFILL_TOKENS
    yield _feed(np.random.default_rng(0), 0, np.tril(np.ones((n, n), dtype=bool)), np.arange(n))


def load_{verify}():
    yield _feed(np.random.default_rng(1), VERIFY_PAST, TREE_MASK, VERIFY_PAST + np.asarray(TREE_DEPTH))


def load_{decode}():
    yield _feed(np.random.default_rng(2), DECODE_PAST, [[True]], [DECODE_PAST])


def load_heads():
    rng = np.random.default_rng(3)
    feed = {{"hidden_states": rng.standard_normal((1, HIDDEN)).astype(DTYPE)}}
    if HYDRA_HEADS:  # Hydra heads also read the path drafted so far: its tokens and length
        feed["path_ids"] = rng.integers(0, VOCAB, size=(1, HYDRA_HEADS), dtype=np.int64)
        feed["path_len"] = rng.integers(1, HYDRA_HEADS + 1, size=(1,), dtype=np.int64)
    yield feed
'''


def data_loader_script(plan: BuildPlan, tree) -> str:
    """The text of ``trt_check_data.py`` for ``plan``; ``tree``: the runtime Tree of the verify opt."""
    if tree.num_nodes != plan.tree_nodes:
        raise PlanError(f"tree {tree.name!r} has {tree.num_nodes} nodes but the plan was made for {plan.tree_nodes}")
    return _DATA_TEMPLATE.format(
        backbone=plan.backbone.onnx,
        heads=plan.heads.onnx,
        dtype=plan.dtype,
        layers=plan.num_layers,
        kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        hidden=plan.hidden_size,
        vocab=plan.vocab_size,
        prefill_tokens=plan.profile(PREFILL).axes[NEW].opt,
        verify_past=plan.profile(VERIFY).axes[PAST].opt,
        decode_past=plan.profile(DECODE).axes[PAST].opt,
        tree=tree.name,
        tree_mask=json.dumps(tree.attn_mask.astype(int).tolist()),
        tree_depth=json.dumps(tree.position_ids.tolist()),
        hydra_heads=plan.heads.inputs["path_ids"][1] if "path_ids" in plan.heads.inputs else 0,
        prefill=PREFILL,
        verify=VERIFY,
        decode=DECODE,
    )


# ---------------------------------------------------------------------------- reports


def profile_table(plan: BuildPlan) -> str:
    """The backbone and heads profiles as a Markdown table (printed, and used in docs)."""
    rows = [
        "| graph | profile | batch | new_tokens (min/opt/max) | past_sequence (min/opt/max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for graph in (plan.backbone, plan.heads):
        for i, p in enumerate(graph.profiles):
            cells = ["/".join(map(str, p.axes[a])) if a in p.axes else "-" for a in ("batch", NEW, PAST)]
            rows.append(f"| {graph.onnx} | {i} {p.name} | {' | '.join(cells)} |")
    return "\n".join(rows)


def script_text(
    commands: list[list[str]], header: str, folder: str | Path | None = None, tail: Sequence[str] = ()
) -> str:
    """A bash script running ``commands`` (then the ``tail`` lines) in the artifact folder: the
    script's own folder, or ``folder`` where the script is written elsewhere (``--write``)."""
    where = 'cd "$(dirname "$0")"' if folder is None else f"cd {shlex.quote(str(Path(folder).resolve()))}"
    lines = ["#!/usr/bin/env bash", f"# {header}", "# Written by medusa-export from trt_plan.json; run from anywhere.",
             "set -euo pipefail", where]  # fmt: skip
    return "\n".join(lines + [shlex.join(c) for c in commands] + list(tail)) + "\n"


def install_lines(plan: BuildPlan) -> list[str]:
    """trtexec.sh's last lines: once both engines are built, each staged engine is renamed into
    place, then the plan they were built from is written beside them (so the backend never finds
    engines and a plan that disagree, whatever was there before or failed half-way)."""
    lines = [shlex.join(["mv", "-f", g.engine + STAGED, g.engine]) for g in (plan.backbone, plan.heads)]
    return lines + [f"cat > {PLAN_FILE}{STAGED} <<'MEDUSA_TRT_PLAN'", plan.to_json().rstrip("\n"), "MEDUSA_TRT_PLAN",
                    shlex.join(["mv", "-f", PLAN_FILE + STAGED, PLAN_FILE])]  # fmt: skip


def stale_plan(folder: Path, plan: BuildPlan) -> bool:
    """True where ``folder`` holds an engine and a plan other than ``plan`` (or none readable):
    writing ``plan`` there now would leave engines the backend refuses."""
    from runtime.plan import read_plan

    if not any((folder / g.engine).is_file() for g in (plan.backbone, plan.heads)):
        return False
    try:
        return read_plan(folder) != plan
    except PlanError:
        return True


# ---------------------------------------------------------------------------- CLI


def _limits_parser(prog: str, description: str) -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(prog=f"medusa-export {prog}", description=description)
    p.add_argument("artifact", help="artifact folder written by medusa-export (holds medusa_config.json)")
    p.add_argument(
        "--max-batch", type=int, default=d.max_batch, help="largest batch the engine takes (default %(default)s)"
    )
    p.add_argument(
        "--max-context", type=int, default=d.max_context, help="cache + new tokens (default: the artifact's context)"
    )
    p.add_argument(
        "--max-prompt",
        type=int,
        default=d.max_prompt,
        help="prefill chunk; longer prompts take several engine calls (default: min(512, max_context // 2))",
    )
    p.add_argument(
        "--opt-prompt",
        type=int,
        default=d.opt_prompt,
        help="typical prompt chunk, the prefill opt, at most --max-prompt (default: min(128, max_prompt))",
    )
    p.add_argument(
        "--max-tree-nodes",
        type=int,
        default=d.max_tree_nodes,
        help="largest tree, root included (default: the tree's size or min(64, max_context - 1), the larger)",
    )
    p.add_argument(
        "--tree", default=d.tree, help="tree whose size is the verify opt (default: the artifact's default tree)"
    )
    p.add_argument(
        "--opt-context",
        type=int,
        default=d.opt_context,
        help="typical cache length, the verify/decode opt, at most max_context - max_tree_nodes "
        "(default: 256, less where the context is smaller)",
    )
    p.add_argument(
        "--workspace-mib", type=int, default=d.workspace_mib, help="builder workspace pool in MiB (default %(default)s)"
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (faster, ~1e-3 relative error)")
    add_verbosity_args(p)
    return p


def _limits(args) -> Limits:
    return Limits(
        max_batch=args.max_batch, max_context=args.max_context, max_prompt=args.max_prompt, opt_prompt=args.opt_prompt,
        max_tree_nodes=args.max_tree_nodes, tree=args.tree, opt_context=args.opt_context,
        workspace_mib=args.workspace_mib, tf32=args.tf32,
    )  # fmt: skip


def _load(args):
    from runtime.artifact import read_artifact

    cfg = read_artifact(args.artifact)
    return cfg, make_plan(cfg, _limits(args))


def write_recipes(
    folder: str | Path, plan: BuildPlan, tree, script: str | Path | None = None, trtexec: str = "trtexec"
) -> dict[str, Path | None]:
    """Write the plan, trtexec.sh, polygraphy_check.sh and trt_check_data.py; return their paths
    (``plan``: None where engines built from another plan are there: trtexec.sh writes it once it
    has built theirs again, :func:`install_lines`)."""
    folder = Path(folder)
    if "/" in trtexec:  # a path, not a name on PATH: the script runs in the artifact folder
        trtexec = str(Path(trtexec).expanduser().resolve())
    build = [trtexec_command(plan, which, trtexec=trtexec, staged=True) for which in ("backbone", "heads")]
    checks = [polygraphy_command(plan, "backbone", p.name) for p in plan.backbone.profiles]
    checks.append(polygraphy_command(plan, "heads"))
    elsewhere = script is not None and Path(script).resolve().parent != folder.resolve()
    plan_path = None if stale_plan(folder, plan) else plan.write(folder)
    paths = {
        "trtexec": Path(script) if script else folder / TRTEXEC_SCRIPT,
        "polygraphy": folder / POLYGRAPHY_SCRIPT,
        "data": folder / DATA_SCRIPT,
    }
    texts = {
        "trtexec": script_text(
            build, "Build the TensorRT engines (TensorRT >= 10.0).", folder if elsewhere else None, install_lines(plan)
        ),  # fmt: skip
        "polygraphy": script_text(checks, "Compare TensorRT with ONNX Runtime on every profile."),
        "data": data_loader_script(plan, tree),
    }
    for key, text in texts.items():  # each whole or not at all
        write_text_atomic(paths[key], text)
    for key in ("trtexec", "polygraphy"):
        paths[key].chmod(0o755)
    return {"plan": plan_path, **paths}


def _cmd_trtexec(argv: list[str]) -> int:
    p = _limits_parser("trtexec", "Print and write the trtexec / polygraphy commands for an artifact.")
    p.add_argument(
        "--write", metavar="FILE", help=f"where to write the trtexec script (default ARTIFACT/{TRTEXEC_SCRIPT})"
    )
    p.add_argument("--trtexec", default="trtexec", help="trtexec executable (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    args = p.parse_args(argv)
    with cli_logging("medusa-export", verbosity(args)):
        if args.write:  # before anything is written into the artifact
            from runtime.paths import check_output_file

            check_output_file("--write", args.write)
        cfg, plan = _load(args)
        tree = resolve_tree(cfg, args.tree)
        paths = write_recipes(args.artifact, plan, tree, script=args.write, trtexec=args.trtexec)
        # --json: stdout is the plan alone (a program reads it); what was written goes to stderr
        say = (lambda text: print(text, file=sys.stderr)) if args.json else print
        print(plan.to_json() if args.json else profile_table(plan), end="" if args.json else "\n")
        build = [
            trtexec_command(plan, which, root=args.artifact, trtexec=args.trtexec) for which in ("backbone", "heads")
        ]
        checks = [polygraphy_command(plan, "backbone", p_.name, root=args.artifact) for p_ in plan.backbone.profiles]
        checks.append(polygraphy_command(plan, "heads", root=args.artifact))
        if verbosity(args) > 0:  # the full command lines: tens of KB of shape flags for a real model
            say(f"\n# build the engines (trtexec.sh builds them under .partial names, then renames them and "
                f"writes the plan; {paths['trtexec']}):")  # fmt: skip
            say("\n".join(shlex.join(c) for c in build))
            say(f"\n# compare TensorRT with ONNX Runtime (also in {paths['polygraphy']}):")
            say("\n".join(shlex.join(c) for c in checks))
        written = [paths[k] for k in ("plan", "trtexec", "polygraphy", "data") if paths[k] is not None]
        say(f"\nwrote {', '.join(map(str, written))}")
        if paths["plan"] is None:
            say(f"kept {Path(args.artifact) / PLAN_FILE}: engines built from it are there, and this plan differs; "
                "trtexec.sh writes the new plan once it has built the engines again")  # fmt: skip
        say(f"build the engines ({len(build)} trtexec commands): bash {shlex.quote(str(paths['trtexec']))}")
        say(
            f"compare TensorRT with ONNX Runtime ({len(checks)} polygraphy runs, one per profile): "
            f"bash {shlex.quote(str(paths['polygraphy']))}"
        )
        if verbosity(args) <= 0:
            say("(-v prints the commands)")
    return 0


def _cmd_build(argv: list[str]) -> int:
    p = _limits_parser("build-engine", "Build the TensorRT engines of an artifact with the TensorRT Python API.")
    args = p.parse_args(argv)
    from exporter.trt_build import build_engines

    with cli_logging("medusa-export", verbosity(args)):
        cfg, plan = _load(args)
        # -v: the build's phases and times; -vv: TensorRT's own verbose log too
        paths = build_engines(args.artifact, plan, cfg, verbose=verbosity(args) >= 2)
        print(profile_table(plan))
        print("built " + ", ".join(str(x) for x in paths))
    return 0


COMMANDS = {"trtexec": _cmd_trtexec, "build-engine": _cmd_build}


def main(argv: list[str] | None = None) -> int:
    """``argv[0]`` is the subcommand (``trtexec`` or ``build-engine``), as exporter/cli.py passes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: medusa-export {{{','.join(COMMANDS)}}} ARTIFACT [options]", file=sys.stderr)
        return 2
    # an engine build takes minutes: Ctrl-C or SIGTERM is one line (and the build's temporary files go)
    with sigterm_as_interrupt():
        return run_cli("medusa-export", lambda: COMMANDS[argv[0]](argv[1:]), interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
