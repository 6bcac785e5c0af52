"""trtexec / polygraphy recipes: command lines parsed back and checked against the plan,
the Polygraphy data loaders, and ``medusa-export trtexec|build-engine`` end to end."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trt_fakes import fake_config, smollm2_config, write_fake_artifact

from exporter import trt_cli
from exporter.trt_cli import (
    DATA_SCRIPT,
    POLYGRAPHY_SCRIPT,
    TRTEXEC_SCRIPT,
    data_loader_script,
    parse_polygraphy,
    parse_trtexec,
    polygraphy_command,
    profile_table,
    trtexec_command,
)
from exporter.trt_plan import Limits, make_plan, resolve_tree
from runtime.plan import NEW, PAST, PLAN_FILE, PlanError, read_plan


def _shapes(graph):
    return [graph.shapes(p) for p in graph.profiles]


@pytest.fixture(scope="module")
def smol():
    cfg = smollm2_config()
    return cfg, make_plan(cfg, Limits(max_context=2048))


# ---------------------------------------------------------------------------- trtexec


@pytest.mark.parametrize("which", ["backbone", "heads"])
def test_trtexec_command_matches_the_plan(smol, which):
    _, plan = smol
    graph = plan.backbone if which == "backbone" else plan.heads
    cmd = trtexec_command(plan, which, root="/art dir")
    parsed = parse_trtexec(shlex.join(cmd))  # through a shell line and back
    assert parsed.onnx == f"/art dir/{graph.onnx}" and parsed.save_engine == f"/art dir/{graph.engine}"
    assert parsed.profiles == _shapes(graph)
    assert parsed.timing_cache == "/art dir/timing.cache"
    assert parsed.mem_pool == {"workspace": "4096M"}
    assert parsed.flags == {"--stronglyTyped", "--noTF32", "--skipInference"}
    assert "--fp16" not in cmd  # precision comes from the ONNX file (strongly typed)


def test_trtexec_profile_blocks_follow_trtexecs_rules(smol):
    _, plan = smol
    cmd = trtexec_command(plan)
    starts = [i for i, a in enumerate(cmd) if a.startswith("--profile=")]
    assert [cmd[i] for i in starts] == ["--profile=0", "--profile=1", "--profile=2"]
    for i in starts:  # trtexec reads the three shape flags right behind --profile
        assert [a.split("=")[0] for a in cmd[i + 1 : i + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    verify = parse_trtexec(cmd).profiles[1]
    assert verify["tree_mask"] == ((1, 1, 1), (1, 9, 9), (1, 64, 64))
    assert verify["past_key_values.0.key"] == ((1, 1, 3, 64), (1, 256, 3, 64), (1, 1984, 3, 64))
    spec = next(a for a in cmd if a.startswith("--minShapes="))
    assert "past_key_values.0.key:1x0x3x64" in spec  # the empty cache of the first prefill
    tf32 = make_plan(smollm2_config(), Limits(max_context=2048, tf32=True, workspace_mib=512))
    parsed = parse_trtexec(trtexec_command(tf32))
    assert "--noTF32" not in parsed.flags and parsed.mem_pool == {"workspace": "512M"}


@pytest.mark.parametrize(
    "line, match",
    [
        ("trtexec --onnx=m.onnx --minShapes=a:1 --optShapes=a:1 --maxShapes=a:1", "outside a --profile block"),
        ("trtexec --profile=1 --minShapes=a:1 --optShapes=a:1 --maxShapes=a:1", "--profile=1 out of order"),
        ("trtexec --profile=0 --minShapes=a:1 --maxShapes=a:1 --onnx=m.onnx", "followed directly by --minShapes"),
        ("trtexec --profile=0 --minShapes=a:1 --optShapes=b:1 --maxShapes=a:1", "name different tensors"),
        ("trtexec --fp16=yes", "unexpected trtexec option --fp16=yes"),
    ],
)
def test_parse_trtexec_refuses_what_trtexec_refuses(line, match):
    with pytest.raises(PlanError, match=match):
        parse_trtexec(line)


# ---------------------------------------------------------------------------- polygraphy


@pytest.mark.parametrize("profile, index", [("prefill", 0), ("verify", 1), ("decode", 2)])
def test_polygraphy_command_matches_the_plan(smol, profile, index):
    _, plan = smol
    parsed = parse_polygraphy(shlex.join(polygraphy_command(plan, "backbone", profile, root="art")))
    assert parsed.model == "art/model.onnx" and parsed.runners == ["onnxrt", "trt"]
    assert parsed.profiles == _shapes(plan.backbone)  # every profile declared, as in the engine
    assert parsed.options["--optimization-profile"] == [str(index)]
    assert parsed.options["--data-loader-script"] == [f"art/{DATA_SCRIPT}:load_{profile}"]
    assert parsed.options["--load-timing-cache"] == parsed.options["--save-timing-cache"] == ["art/timing.cache"]
    assert parsed.options["--pool-limit"] == ["workspace:4096M"]
    assert parsed.options["--atol"] == ["0.1"] and parsed.options["--rtol"] == ["0.05"]  # float16 artifact
    assert parsed.flags == {"--strongly-typed", "-qq"}  # -qq: results and warnings, not the build log


def test_polygraphy_heads_command(smol):
    _, plan = smol
    parsed = parse_polygraphy(polygraphy_command(plan, "heads"))
    assert parsed.model == "heads.onnx"
    assert parsed.profiles == [{"hidden_states": ((1, 576), (1, 576), (1, 576))}]
    assert parsed.options["--data-loader-script"] == [f"{DATA_SCRIPT}:load_heads"]
    with pytest.raises(PlanError, match="no profile named 'verify'"):
        polygraphy_command(plan, "heads", "verify")


def test_polygraphys_own_parser_reads_the_same_profiles(smol, tmp_path):
    """``polygraphy run ... --gen-script`` parses the command with Polygraphy itself (no TensorRT needed)."""
    pytest.importorskip("polygraphy", reason="the [export] extra (polygraphy) is not installed")
    # the package installs its command next to the interpreter (as scripts/device_check.py finds it):
    # importable without the command is a broken install, a failure rather than a skip
    exe = Path(sys.executable).parent / "polygraphy"
    assert exe.is_file(), f"polygraphy is importable but {exe} is missing"
    _, plan = smol
    out = tmp_path / "gen.py"
    cmd = polygraphy_command(plan, "backbone", "verify", root=tmp_path) + ["--gen-script", str(out)]
    subprocess.run([exe, *cmd[1:]], check=True, capture_output=True, timeout=60)
    script = out.read_text()
    block = re.search(r"^profiles = (\[.*?^\])", script, re.S | re.M).group(1)
    from polygraphy.backend.trt import Profile

    profiles = eval(block, {"Profile": Profile})
    got = [{name: tuple(tuple(s) for s in shapes) for name, shapes in p.items()} for p in profiles]
    assert got == _shapes(plan.backbone)
    assert "TrtRunner(deserialize_engine, optimization_profile=1)" in script
    assert "name='load_verify'" in script and "strongly_typed=True" in script
    assert "memory_pool_limits={trt.MemoryPoolType.WORKSPACE: 4294967296}" in script


# ---------------------------------------------------------------------------- data loaders


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location("trt_check_data_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_data_loaders_feed_shapes_inside_their_profiles(tmp_path, dtype):
    cfg = fake_config(layers=3, kv_heads=2, head_dim=4, hidden=8, vocab=50, max_context=128, dtype=dtype)
    plan = make_plan(cfg, Limits(max_prompt=32, opt_prompt=20, opt_context=40))
    tree = resolve_tree(cfg)
    path = tmp_path / DATA_SCRIPT
    path.write_text(data_loader_script(plan, tree))
    data = _load_module(path)
    for profile in plan.backbone.profiles:
        (feed,) = list(getattr(data, f"load_{profile.name}")())
        assert list(feed) == list(plan.backbone.inputs)
        n = feed["input_ids"].shape[1]
        past = feed["past_key_values.0.key"].shape[1]
        assert (n, past) == (profile.axes[NEW].opt, profile.axes[PAST].opt)  # the shapes TensorRT tuned for
        for name, (lo, _, hi) in plan.backbone.shapes(profile).items():
            assert all(a <= d <= b for a, d, b in zip(lo, feed[name].shape, hi)), (profile.name, name)
        assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].max() < 50
        assert feed["tree_mask"].dtype == np.bool_
        assert feed["past_key_values.2.value"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(
            feed["position_ids"][0], past + np.arange(n) if profile.name != "verify" else past + tree.position_ids
        )
    (verify,) = list(data.load_verify())
    np.testing.assert_array_equal(verify["tree_mask"][0], tree.attn_mask)
    (heads,) = list(data.load_heads())
    assert heads["hidden_states"].shape == (1, 8) and heads["hidden_states"].dtype == np.dtype(dtype)
    assert list(heads) == list(plan.heads.inputs)
    with pytest.raises(PlanError, match="has 5 nodes but the plan was made for 9"):
        data_loader_script(plan, resolve_tree(cfg, "chain_4"))


def test_the_heads_loader_feeds_every_input_of_hydra_heads(tmp_path):
    """Hydra heads read the drafted path too (path_ids [rows, K], path_len [rows] in 1..K): the
    heads feed names every input the plan's heads profile shapes, each inside it."""
    import dataclasses

    from runtime.artifact import HYDRA_INPUTS, GraphSpec

    cfg = fake_config(heads=3, vocab=50, tree="chain_3")
    graph = GraphSpec("heads.onnx", list(HYDRA_INPUTS), ["medusa_logits"], {n: ["batch"] for n in HYDRA_INPUTS})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, medusa_head_type="hydra"), heads=graph)
    plan = make_plan(cfg)
    path = tmp_path / DATA_SCRIPT
    path.write_text(data_loader_script(plan, resolve_tree(cfg)))
    (feed,) = list(_load_module(path).load_heads())
    assert list(feed) == list(plan.heads.inputs) == list(HYDRA_INPUTS)
    for name, (lo, _, hi) in plan.heads.shapes(plan.heads.profiles[0]).items():
        assert len(feed[name].shape) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, feed[name].shape, hi)), name
    assert feed["path_ids"].dtype == np.int64 and feed["path_ids"].max() < 50 and 1 <= feed["path_len"][0] <= 3


# ---------------------------------------------------------------------------- the CLI


def test_profile_table(smol):
    _, plan = smol
    table = profile_table(plan)
    assert "| model.onnx | 1 verify | 1/1/1 | 1/9/64 | 1/256/1984 |" in table
    assert "| heads.onnx | 0 heads | 1/1/1 | - | - |" in table


def test_cli_trtexec_writes_and_prints_the_recipes(tmp_path, capsys):
    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    assert trt_cli.main(["trtexec", str(folder), "--max-prompt", "64", "--opt-context", "100", "-v"]) == 0
    out = capsys.readouterr().out
    plan = read_plan(folder)
    assert plan.profile("prefill").axes[NEW].max == 64 and plan.profile("verify").axes[PAST].opt == 100
    script = (folder / TRTEXEC_SCRIPT).read_text().splitlines()
    assert script[0] == "#!/usr/bin/env bash" and 'cd "$(dirname "$0")"' in script
    build = [parse_trtexec(line) for line in script if line.startswith("trtexec ")]
    assert [b.save_engine for b in build] == ["model.engine.partial", "heads.engine.partial"]
    assert build[0].profiles == _shapes(plan.backbone) and build[1].profiles == _shapes(plan.heads)
    checks = [
        parse_polygraphy(line)
        for line in (folder / POLYGRAPHY_SCRIPT).read_text().splitlines()
        if line.startswith("polygraphy ")
    ]
    assert [c.options["--data-loader-script"][0].split(":")[-1] for c in checks] == [
        "load_prefill",
        "load_verify",
        "load_decode",
        "load_heads",
    ]
    ast.parse((folder / DATA_SCRIPT).read_text())
    # the printed commands name the artifact folder
    printed = [line for line in out.splitlines() if line.startswith("trtexec ")]
    assert parse_trtexec(printed[0]).onnx == str(folder / "model.onnx")
    assert "| model.onnx | 0 prefill | 1/1/1 | 1/64/64 | 0/0/192 |" in out
    assert (folder / TRTEXEC_SCRIPT).stat().st_mode & 0o111


def test_cli_trtexec_is_short_by_default(tmp_path, capsys):
    """The full command lines (tens of KB of shape flags for a real model) are in the scripts;
    the default output is the table and where the scripts are, -v prints the commands too."""
    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    assert trt_cli.main(["trtexec", str(folder)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert not any(line.startswith(("trtexec ", "polygraphy ")) for line in lines) and not err
    assert len(lines) <= 14 and len(out) < 2000, out
    assert f"bash {folder / TRTEXEC_SCRIPT}" in out and f"bash {folder / POLYGRAPHY_SCRIPT}" in out
    assert trt_cli.main(["trtexec", str(folder), "-v"]) == 0
    verbose = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("trtexec ", "polygraphy ")) for line in verbose) == 2 + 4  # 2 engines, 4 profiles
    assert trt_cli.main(["trtexec", str(folder), "-q"]) == 0  # -q: the output stays (stderr would be quiet)
    assert capsys.readouterr().out == out


# a stand-in for trtexec: reads --onnx (relative to where the script runs), writes --saveEngine; exits 1
# for the ONNX file named in $FAIL_ON
FAKE_TRTEXEC = """#!/usr/bin/env bash
for a in "$@"; do case "$a" in --onnx=*) onnx="${a#--onnx=}";; --saveEngine=*) engine="${a#--saveEngine=}";; esac; done
test -f "$onnx" || { echo "no $onnx in $PWD" >&2; exit 3; }
test "$onnx" != "${FAIL_ON:-}" || exit 1
echo "built from $onnx" > "$engine"
"""


def _fake_trtexec(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    exe = where / "trtexec"
    exe.write_text(FAKE_TRTEXEC)
    exe.chmod(0o755)
    return exe


def _run_script(script: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})


def test_cli_trtexec_write_elsewhere_and_json(tmp_path, capsys, monkeypatch):
    """A script written outside the artifact (--write) builds in the artifact, a relative --trtexec
    included, run from anywhere; --json prints the plan alone on stdout."""
    import json

    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    (folder / "model.onnx").write_text("onnx")
    (folder / "heads.onnx").write_text("onnx")
    _fake_trtexec(tmp_path / "bin")
    target = tmp_path / "scripts" / "build.sh"
    target.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    assert trt_cli.main(["trtexec", str(folder), "--write", str(target), "--json", "--trtexec", "bin/trtexec"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["format_version"] == 1 and f"bash {target}" in err
    plan = read_plan(folder)
    assert not (folder / TRTEXEC_SCRIPT).exists()
    run = _run_script(target, tmp_path / "scripts")
    assert run.returncode == 0, run.stderr
    assert (folder / "model.engine").read_text() == "built from model.onnx\n"
    assert (folder / "heads.engine").read_text() == "built from heads.onnx\n"
    assert read_plan(folder) == plan and not list(folder.glob("*.partial"))


def test_trtexec_keeps_the_plan_its_engines_were_built_from(tmp_path, capsys):
    """New limits beside built engines: the old plan stays until trtexec.sh has built both engines
    again; a failed build leaves the old engines and their plan."""
    from trt_fakes import write_fake_engines

    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    (folder / "model.onnx").write_text("onnx")
    (folder / "heads.onnx").write_text("onnx")
    exe = _fake_trtexec(tmp_path / "bin")
    assert trt_cli.main(["trtexec", str(folder), "--trtexec", str(exe)]) == 0
    old = read_plan(folder)
    write_fake_engines(folder, old)
    engines = {g.engine: (folder / g.engine).read_bytes() for g in (old.backbone, old.heads)}
    capsys.readouterr()
    assert trt_cli.main(["trtexec", str(folder), "--max-prompt", "64", "--trtexec", str(exe)]) == 0
    assert f"kept {folder / PLAN_FILE}" in capsys.readouterr().out
    assert read_plan(folder) == old  # the engines there still match it
    failed = _run_script(folder / TRTEXEC_SCRIPT, tmp_path, FAIL_ON="heads.onnx")
    assert failed.returncode != 0
    assert read_plan(folder) == old and all((folder / n).read_bytes() == b for n, b in engines.items())
    assert _run_script(folder / TRTEXEC_SCRIPT, tmp_path).returncode == 0
    new = read_plan(folder)
    assert new != old and new.profile("prefill").axes[NEW].max == 64
    assert (folder / "heads.engine").read_text() == "built from heads.onnx\n"
    # the same limits again: the plan matches, so it is written at once
    assert trt_cli.main(["trtexec", str(folder), "--max-prompt", "64"]) == 0
    assert "kept" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--max-context", "999"], r"max_context must lie in \[2, 256\].*got 999"),
        (["--max-tree-nodes", "4"], r"max_tree_nodes 4 is smaller than tree 'cpu_8'"),
        (["--tree", "nope"], r"unknown tree 'nope'"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys, args, match):
    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    assert trt_cli.main(["trtexec", str(folder), *args]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err) and err.startswith("medusa-export: error: ") and "Traceback" not in err


def test_cli_missing_artifact_and_usage(tmp_path, capsys):
    assert trt_cli.main(["trtexec", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert trt_cli.main(["frobnicate"]) == 2
    assert "usage: medusa-export {trtexec,build-engine}" in capsys.readouterr().err


def test_cli_build_engine_without_tensorrt(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    assert trt_cli.main(["build-engine", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medusa-export: error: TensorRT is not installed") and err.count("\n") == 1


@pytest.mark.parametrize("where", ["nodir/build.sh", "."])
def test_cli_trtexec_write_to_a_bad_path_writes_nothing(tmp_path, capsys, where):
    """--write into a missing folder, or onto a folder: one line, and nothing written into the artifact."""
    folder = write_fake_artifact(tmp_path / "art", fake_config(max_context=256))
    before = sorted(folder.iterdir())
    assert trt_cli.main(["trtexec", str(folder), "--write", str(tmp_path / where)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medusa-export: error: --write "), err
    assert sorted(folder.iterdir()) == before
