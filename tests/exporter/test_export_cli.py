"""``medusa-export`` command line: a run on a tiny model folder, --help, and user errors
(exit 1, one paragraph on stderr, no traceback)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, hf_greedy, make_tiny_causal_lm

from exporter import cli
from exporter.heads import fresh_heads, save_heads


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, wordlevel_tokenizer) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (config, safetensors, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    config = LlamaConfig(**TINY_LLAMA)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(str(folder))
    wordlevel_tokenizer.save_pretrained(str(folder))
    return folder


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *phrases):
    assert code == 1
    assert "Traceback" not in err
    assert "medusa-export: error:" in err
    before, text = err.split("medusa-export: error:", 1)
    # progress lines (if any) come first; the error is the last thing printed, one paragraph
    assert all(line.startswith("[medusa-export]") for line in before.splitlines()), before
    text = text.strip()
    assert text and "\n\n" not in text
    for p in phrases:
        assert p in text, (p, text)


def test_export_with_fresh_heads(model_folder, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    loads = []  # the tokenizer the preflight loads is the one the export uses: loaded once
    real = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", classmethod(lambda c, *a, **k: loads.append(a) or real(c, *a, **k))
    )
    out = tmp_path / "artifact"
    code, stdout, stderr = run_cli(
        [model_folder, "--fresh-heads", "2", "-o", out, "--max-context", "128", "-v"], capsys
    )
    assert code == 0, stderr
    assert len(loads) == 1, loads
    for step in (
        "loading",
        "writing the fused backbone",
        "saving model.onnx",
        "tracing the Medusa heads",
        "validating ONNX Runtime against PyTorch",
        "validation passed",
    ):
        assert step in stderr, step
    assert "done (" in stderr  # a step line with elapsed seconds
    assert f"artifact written to {out}" in stdout and "model.onnx" in stdout and "validation: passed" in stdout
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert cfg["model"]["max_context"] == 128 and cfg["model"]["num_medusa_heads"] == 2
    assert cfg["default_tree"] == "chain_2"
    assert (cfg["flavour"], cfg["precision"]) == ("fused", "fp32")  # the defaults
    assert cfg["provenance"]["heads"]["layout"] == "fresh-identity"
    assert cfg["provenance"]["source_model"] == str(model_folder)
    assert cfg["provenance"]["source_model_path"] == str(model_folder.resolve())  # what --peer loads


def test_a_qwen3_folder_exports_and_decodes_like_hugging_face(tmp_path, capsys, wordlevel_tokenizer):
    """A Qwen3 folder as a user has one (tied embeddings, ``head_dim`` 32 so that the query width, 128, is
    not the hidden size, 64; per-head Q/K norms with their own weights) through ``medusa-export`` with
    fresh heads, then ``runtime.load``: plain and Medusa greedy decoding equal Hugging Face's, on the
    fused graph and on the batch engine the server runs."""
    import runtime

    model = make_tiny_causal_lm(
        "qwen3",
        3,
        hidden_size=64,
        head_dim=32,
        tie_word_embeddings=True,
        eos_token_id=None,
        max_position_embeddings=128,
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    folder = tmp_path / "tiny-qwen3"
    model.save_pretrained(str(folder))
    wordlevel_tokenizer.save_pretrained(str(folder))
    out = tmp_path / "artifact"
    code, stdout, stderr = run_cli([folder, "--fresh-heads", "3", "-o", out], capsys)
    assert code == 0, stderr
    assert "validation: passed" in stdout
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert cfg["flavour"] == "fused" and cfg["model"]["head_dim"] == 32
    ids = [5, 17, 40, 9, 88, 3, 61]
    want = hf_greedy(model, ids, 20)
    gen = runtime.load(out, backend="onnxruntime", threads=1)
    assert gen.generate(ids, max_new_tokens=20, medusa=False).tokens == want
    assert gen.generate(ids, max_new_tokens=20, tree="chain_2").tokens == want
    batch = runtime.load(out, backend="onnxruntime", threads=1, max_batch=2)
    assert batch.generate(ids, max_new_tokens=20, tree="chain_2").tokens == want


def test_export_is_quiet_by_default_and_detailed_with_v(model_folder, tmp_path, capsys):
    """Default: the summary on stdout (where, which files, the validation, the time) and nothing on
    stderr; -v adds the steps with their times, -vv every comparison; -q keeps the summary."""
    argv = [model_folder, "--fresh-heads", "2", "-o", tmp_path / "a", "--max-context", "64", "--force"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert err == "" and len(out.splitlines()) <= 5, out
    assert f"artifact written to {tmp_path / 'a'} in " in out and "model.onnx" in out and "validation: passed" in out
    code, out_v, err_v = run_cli([*argv, "-v"], capsys)
    assert code == 0 and out_v.splitlines()[1:] == out.splitlines()[1:]  # the same summary (but the time)
    steps = err_v.splitlines()
    assert 5 <= len(steps) <= 20 and all(line.startswith("[medusa-export] ") for line in steps), err_v
    assert "done (" in err_v and "validation passed" in err_v and "PASS " not in err_v
    code, _, err_vv = run_cli([*argv, "-vv"], capsys)
    assert code == 0 and len(err_vv.splitlines()) > 3 * len(steps) and "PASS " in err_vv
    code, out_q, err_q = run_cli([*argv, "-q"], capsys)
    assert code == 0 and err_q == "" and out_q.splitlines()[1:] == out.splitlines()[1:]


def test_export_with_saved_heads_fp16_no_validate(model_folder, tmp_path, capsys):
    heads = fresh_heads(4, 32, 128, num_layers=1)
    save_heads(heads, tmp_path / "heads", meta={"trained_on": "nothing"})
    out = tmp_path / "artifact"
    code, stdout, stderr = run_cli(
        [
            model_folder,
            "--heads",
            tmp_path / "heads",
            "-o",
            out,
            "--dtype",
            "float16",
            "--tree",
            "cpu_4",
            "--no-validate",
            "--opset",
            "17",
            "--graph",
            "portable",
            "--external-data-threshold-mb",
            "0",
        ],
        capsys,
    )
    assert code == 0, stderr
    assert "validating" not in stderr and "validation: skipped" in stdout
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["opset"] == 17 and cfg["default_tree"] == "cpu_4"
    assert cfg["provenance"]["heads"]["layout"] == "medusa-trt"
    assert cfg["provenance"]["heads"]["meta"]["trained_on"] == "nothing"
    assert cfg["provenance"]["validation"] == {"skipped": True}
    assert (out / "model.onnx.data").is_file() and (out / "heads.onnx.data").is_file()


def test_existing_output_needs_force(model_folder, tmp_path, capsys):
    out = tmp_path / "artifact"
    out.mkdir()
    code, _, err = run_cli([model_folder, "--fresh-heads", "1", "-o", out], capsys)
    assert_user_error(code, err, "already exists", "--force")
    code, _, err = run_cli([model_folder, "--fresh-heads", "1", "-o", out, "--force", "--no-validate"], capsys)
    assert code == 0, err
    assert (out / "model.onnx").is_file()


def test_no_such_model_folder(tmp_path, capsys):
    code, _, err = run_cli([tmp_path / "nope", "--fresh-heads", "2", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "not found", "smollm2-135m")
    assert not (tmp_path / "out").exists()


def test_a_missing_model_is_named_before_the_heads(tmp_path, capsys):
    """No --heads for a model that does not exist: the error is the model, not the heads."""
    code, _, err = run_cli([tmp_path / "no" / "such" / "folder", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "not found", "no such folder", "not a known model name", "smollm2-135m")
    assert "heads" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli([tmp_path / "empty", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "not a Hugging Face model folder", "config.json")
    assert "heads" not in err
    code, _, err = run_cli(["smollm2-13b", "-o", tmp_path / "out"], capsys)  # a name we do not know
    assert_user_error(code, err, "'smollm2-13b' not found", "not a known model name")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,trees",
    [
        (["smollm2-135m"], ("smollm2_ort_cpu", "chain_1")),  # the fused fp32 graph: the tree measured for it
        (["smollm2-135m", "--heads", str(cli.SHIPPED_HEADS / "smollm2-135m")], ("smollm2_ort_cpu", "chain_1")),
        (["smollm2-135m", "--precision", "int4"], ("chain_1", "chain_1")),
        (["smollm2-135m", "--precision", "int8"], ("chain_1", "chain_1")),
        (["smollm2-135m", "--tree", "cpu_4"], ("cpu_4", "chain_1")),
        (["smollm2-135m", "--sampling-tree", "chain_2"], ("smollm2_ort_cpu", "chain_2")),
        (["smollm2-135m", "--fresh-heads", "4"], (None, None)),  # other heads: the exporter's generic default
        (["some/model", "--heads", "h"], (None, None)),
    ],
)
def test_default_trees(argv, trees):
    args = cli.build_parser().parse_args([*argv, "-o", "out"])
    assert cli.default_trees(args, args.precision) == trees


@pytest.mark.slow
def test_the_default_export_records_the_measured_tree(tmp_path, capsys):
    """`medusa-export smollm2-135m -o OUT` (README) records smollm2_ort_cpu, the tree selected for the
    shipped heads on the fused fp32 graph's cost profile, and chain_1 for exact sampling."""
    out = tmp_path / "art"
    code, stdout, err = run_cli(["smollm2-135m", "-o", out, "--no-validate", "--no-heads-int8"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert (cfg["default_tree"], cfg["sampling_tree"], cfg["flavour"], cfg["precision"]) == (
        "smollm2_ort_cpu",
        "chain_1",
        "fused",
        "fp32",
    )
    assert "default tree smollm2_ort_cpu" in stdout
    assert (out / "datastore.npz").is_file()  # the shipped datastore comes with the shipped heads


def test_heads_that_do_not_match(model_folder, tmp_path, capsys):
    save_heads(fresh_heads(2, 16, 128), tmp_path / "small-heads")
    code, _, err = run_cli([model_folder, "--heads", tmp_path / "small-heads", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "do not fit the backbone", "16", "32")
    code, _, err = run_cli([model_folder, "--heads", tmp_path / "missing", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "not found")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    code, _, err = run_cli([folder, "--fresh-heads", "2", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "GPT2LMHeadModel", "not supported", "LlamaForCausalLM")


@pytest.mark.parametrize(
    "text, phrases",
    [
        ('{"architectures": ["LlamaForCausalLM"],', ("config.json", "not valid JSON")),
        ('["LlamaForCausalLM"]', ("config.json", "must hold a JSON object, found a list")),
        ('{"architectures": "GPT2LMHeadModel"}', ("architecture GPT2LMHeadModel is not supported",)),
    ],
)
def test_a_malformed_config_is_one_line(tmp_path, capsys, text, phrases):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    code, _, err = run_cli([folder, "--fresh-heads", "2", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, *phrases)


def test_folder_without_weights(tmp_path, model_folder, capsys):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((model_folder / "config.json").read_text())
    code, _, err = run_cli([folder, "--fresh-heads", "2", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "cannot load the model", "holds no weights")


def test_missing_heads_and_bad_options(model_folder, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli([model_folder, "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "no Medusa heads given", "--heads", "--fresh-heads")
    monkeypatch.setattr(cli, "SHIPPED_HEADS", tmp_path / "no-shipped-heads")
    code, _, err = run_cli(["smollm2-135m", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "shipped", "--fresh-heads")
    code, _, err = run_cli([model_folder, "--fresh-heads", "2", "-o", tmp_path / "out", "--opset", "21"], capsys)
    assert_user_error(code, err, "opset 21", "17-20")
    code, _, err = run_cli([model_folder, "--fresh-heads", "2", "-o", tmp_path / "out", "--tree", "cpu_8"], capsys)
    assert_user_error(code, err, "needs 4 Medusa heads")
    code, _, err = run_cli([model_folder, "--fresh-heads", "0", "-o", tmp_path / "out"], capsys)
    assert_user_error(code, err, "at least 1 head")
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2
        cli.main([str(model_folder), "--heads", "x", "--fresh-heads", "2", "-o", str(tmp_path / "out")])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()


def test_trt_subcommands_are_dispatched(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("exporter.trt_cli")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "exporter.trt_cli", fake)
    assert cli.main(["trtexec", "some/artifact"]) == 7
    assert cli.main(["build-engine", "x", "--flag"]) == 7
    assert seen == [["trtexec", "some/artifact"], ["build-engine", "x", "--flag"]]


def test_help_in_a_subprocess():
    exe = Path(sys.executable).parent / "medusa-export"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "exporter.cli"]
    r = subprocess.run(
        [*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2]
    )
    assert r.returncode == 0, r.stderr
    for phrase in (
        "MODEL",
        "--heads",
        "--fresh-heads",
        "--dtype",
        "--opset",
        "--external-data-threshold-mb",
        "--tree",
        "--max-context",
        "--force",
        "--no-validate",
        "tree_mask",
        "past_key_values",
        "present",
        "new_tokens",
        "past_sequence",
        "trtexec",
    ):
        assert phrase in r.stdout, phrase


def _polygraphy(*args, cwd):
    exe = Path(sys.executable).parent / "polygraphy"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "polygraphy.tools._main"]
    r = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASSED" in r.stdout + r.stderr
    return r.stdout + r.stderr


def test_polygraphy_recipe_runs_as_documented(model_folder, tmp_path, capsys):
    """docs/graph_contract.md: ORT (no graph optimizations) vs ORT (all), and ORT vs PyTorch,
    through scripts/polygraphy_data_loader.py, on CPU."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "artifact"
    assert (
        cli.main([str(model_folder), "--fresh-heads", "4", "-o", str(out), "--no-validate", "--graph", "portable"]) == 0
    )
    capsys.readouterr()
    loader = root / "scripts" / "polygraphy_data_loader.py"
    ref = tmp_path / "ort_ref.json"
    _polygraphy(
        "run",
        out / "model.onnx",
        "--onnxrt",
        "--graph-optimization-level",
        "ORT_DISABLE_ALL",
        "--data-loader-script",
        loader,
        "--save-outputs",
        ref,
        cwd=root,
    )

    def against(outputs):  # ORT (all graph optimizations) against saved reference outputs
        compare = ["--load-outputs", outputs, "--atol", "1e-3", "--rtol", "1e-3"]
        return _polygraphy("run", out / "model.onnx", "--onnxrt", "--data-loader-script", loader, *compare, cwd=root)

    log = against(ref)
    assert "Passed: 4/4 iterations" in log
    # the heads graph gets its own feeds
    log = _polygraphy("run", out / "heads.onnx", "--onnxrt", "--data-loader-script", loader, cwd=root)
    assert "medusa_logits" in log
    # PyTorch as the reference backend
    torch_ref = tmp_path / "torch_ref.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.polygraphy_data_loader",
            "--torch-outputs",
            str(torch_ref),
            str(out),
            str(model_folder),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = against(torch_ref)
    assert "vs. pytorch" in log and "Passed: 4/4 iterations" in log


# ---------------------------------------------------------------------------- the datastore


def test_export_copies_a_datastore_and_checks_its_vocabulary(model_folder, tmp_path, capsys):
    import runtime
    from runtime.datastore import Datastore

    vocab = TINY_LLAMA["vocab_size"]
    good, foreign = tmp_path / "good.npz", tmp_path / "foreign.npz"
    Datastore.build([[1, 2, 3, 4]] * 3, vocab, source="toy").save(good)
    Datastore.build([[1, 2, 3, 4]] * 3, vocab + 1).save(foreign)
    base = [model_folder, "--fresh-heads", "2", "--max-context", "128", "--no-validate", "--no-heads-int8"]

    code, _, err = run_cli([*base, "-o", tmp_path / "bad", "--datastore", foreign], capsys)
    assert_user_error(code, err, f"vocabulary of {vocab + 1} tokens, the model has {vocab}")
    assert not (tmp_path / "bad").exists()  # nothing half-written
    code, _, err = run_cli([*base, "-o", tmp_path / "missing", "--datastore", tmp_path / "nope.npz"], capsys)
    assert_user_error(code, err, "nope.npz: no such file")

    out = tmp_path / "art"
    code, _, err = run_cli([*base, "-o", out, "--datastore", good], capsys)
    assert code == 0, err
    assert (out / "datastore.npz").read_bytes() == good.read_bytes()
    prov = json.loads((out / "medusa_config.json").read_text())["provenance"]["datastore"]
    assert prov["source"] == "toy" and prov["vocab_size"] == vocab
    assert prov["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    gen = runtime.load(out, threads=1)
    try:
        assert gen.datastore is not None and gen.datastore.propose([1, 2], 2) == [3, 4]
    finally:
        gen.close()


@pytest.mark.parametrize(
    "argv,shipped",
    [
        (["smollm2-135m"], True),
        (["smollm2-135m", "--heads", str(cli.SHIPPED_HEADS / "smollm2-135m-hydra")], True),  # any heads
        (["smollm2-135m", "--datastore", "none"], False),
        (["some/model", "--heads", "h"], False),
    ],
)
def test_the_embedded_model_gets_the_shipped_datastore(argv, shipped):
    args = cli.build_parser().parse_args([*argv, "-o", "out"])
    path = cli.default_datastore(args)
    assert (path == str(cli.SHIPPED_DATASTORE / "smollm2-135m" / "datastore.npz")) if shipped else path is None


def test_the_shipped_datastore_fits_the_embedded_model():
    from runtime.datastore import Datastore

    ds = Datastore.load(cli.SHIPPED_DATASTORE / "smollm2-135m" / "datastore.npz", vocab_size=49152)
    assert ds.meta["source"].endswith("train split") and ds.meta["tokens"] > 500_000 and len(ds) > 100_000


def test_num_heads_keeps_the_first_heads(model_folder, tmp_path, capsys):
    base = [model_folder, "--fresh-heads", "3", "--max-context", "128", "--no-validate", "--no-heads-int8"]
    code, _, err = run_cli([*base, "-o", tmp_path / "zero", "--num-heads", "0"], capsys)
    assert_user_error(code, err, "--num-heads must be at least 1")
    code, _, err = run_cli([*base, "-o", tmp_path / "four", "--num-heads", "4"], capsys)
    assert_user_error(code, err, "these heads have 3")
    assert not (tmp_path / "four").exists()
    out = tmp_path / "one"
    code, _, err = run_cli([*base, "-o", out, "--num-heads", "1"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "medusa_config.json").read_text())
    assert cfg["model"]["num_medusa_heads"] == 1 and cfg["default_tree"] == "chain_1"
    assert cfg["provenance"]["heads"]["meta"]["kept_heads"] == "1 of 3"


def test_if_changed_keeps_a_current_artifact_and_replaces_a_stale_one(model_folder, tmp_path, capsys, monkeypatch):
    import os

    import exporter.recipe as recipe

    out = tmp_path / "artifact"
    base = [model_folder, "--fresh-heads", "2", "-o", out, "--no-validate", "--if-changed"]
    code, stdout, err = run_cli([*base[:-1], "--max-context", "128"], capsys)  # a plain export records it too
    assert code == 0, err
    assert f"artifact written to {out}" in stdout and "replaced" not in stdout
    rec = json.loads((out / "medusa_config.json").read_text())["provenance"]["recipe"]
    assert rec["sha256"] == recipe.recipe_digest(rec) and rec["code"] == recipe.code_digest()
    assert [name for name, *_ in rec["inputs"]["model_files"]] == sorted(p.name for p in model_folder.iterdir())
    stamp = (out / "model.onnx").stat().st_mtime_ns, (out / "medusa_config.json").read_bytes()

    # the same command: nothing is written; --check says so with exit status 0
    code, stdout, err = run_cli([*base, "--max-context", "128"], capsys)
    assert code == 0, err
    assert f"{out} is current" in stdout and "kept" in stdout and "written" not in stdout
    assert ((out / "model.onnx").stat().st_mtime_ns, (out / "medusa_config.json").read_bytes()) == stamp
    code, stdout, err = run_cli([*base, "--max-context", "128", "--check"], capsys)
    assert code == 0 and f"{out} is current" in stdout, (stdout, err)
    code, stdout, err = run_cli([*base, "--max-context", "96", "--check"], capsys)  # would replace: 3, nothing written
    assert code == cli.STALE == 3 and "is not current: the export options changed" in stdout, (stdout, err)
    code, stdout, _ = run_cli([*base[:-3], tmp_path / "absent", "--if-changed", "--check"], capsys)
    assert code == 3 and "is not current: it does not exist" in stdout and not (tmp_path / "absent").exists()
    assert ((out / "model.onnx").stat().st_mtime_ns, (out / "medusa_config.json").read_bytes()) == stamp
    code, _, err = run_cli([*base[:-1], "--check"], capsys)
    assert_user_error(code, err, "--check", "--if-changed")

    def exported_again(argv, *why):
        code, stdout, err = run_cli(argv, capsys)
        assert code == 0, err
        assert f"artifact written to {out}" in stdout, stdout
        line = next(x for x in stdout.splitlines() if "replaced what was there" in x)
        for w in why:
            assert w in line, (w, line)
        return line

    # another option, then the code, then a model file, then a file of the artifact
    exported_again([*base, "--max-context", "96"], "the export options changed")
    assert json.loads((out / "medusa_config.json").read_text())["model"]["max_context"] == 96
    monkeypatch.setattr(recipe, "code_digest", lambda: "0" * 64)
    line = exported_again([*base, "--max-context", "96"], "medusa-trt's code changed")
    assert "options" not in line
    weights = next(model_folder.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    exported_again([*base, "--max-context", "96"], "the model's files changed")
    tree = tmp_path / "t.json"  # a tree given as a file: its contents count, not only its path
    tree.write_text("[[0], [0, 0]]")
    exported_again([*base, "--max-context", "96", "--tree", tree], "the export options changed")
    tree.write_text("[[0]]")
    exported_again([*base, "--max-context", "96", "--tree", tree], "a tree file changed")
    assert json.loads((out / "medusa_config.json").read_text())["default_tree_paths"] == [[0]]
    monkeypatch.setenv("MEDUSA_TRT_ACCURACY_LEVEL", "4")  # the int8/int4 quantizer reads it
    exported_again([*base, "--max-context", "96", "--tree", tree], "the environment")
    with open(out / "heads.onnx", "ab") as f:  # the same recipe, a file no longer what the export wrote
        f.write(b"\0")
    exported_again([*base, "--max-context", "96", "--tree", tree], "the runtime refuses it", "heads.onnx")
    code, stdout, err = run_cli([*base, "--max-context", "96", "--tree", tree], capsys)
    assert code == 0 and "is current" in stdout, (stdout, err)

    # a stale artifact beside files an export did not write is never replaced
    (out / "model.plan").write_bytes(b"engine")
    code, _, err = run_cli([*base, "--max-context", "64"], capsys)
    assert_user_error(code, err, "did not write", "model.plan")
    assert json.loads((out / "medusa_config.json").read_text())["model"]["max_context"] == 96
    # ... nor is a folder that is no artifact
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli([model_folder, "--fresh-heads", "2", "-o", other, "--if-changed"], capsys)
    assert_user_error(code, err, "not a medusa-trt artifact")
    assert (other / "notes.txt").read_text() == "mine"


def test_the_code_digest_covers_sources_not_caches_or_shipped_data(tmp_path, monkeypatch):
    import exporter.recipe as recipe

    pkg = tmp_path / "fakepkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "shipped_heads").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "graph.py").write_text("X = 1\n")
    (pkg / "tree.json").write_text("[[0]]")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(recipe, "CODE_PACKAGES", ("fakepkg",))
    first = recipe.code_digest()
    (pkg / "__pycache__" / "graph.cpython-311.pyc").write_bytes(b"x")
    (pkg / "shipped_heads" / "config.json").write_text("{}")
    (pkg / "notes.md").write_text("not code")
    assert recipe.code_digest() == first
    (pkg / "graph.py").write_text("X = 2\n")
    second = recipe.code_digest()
    assert second != first
    (pkg / "tree.json").write_text("[[1]]")
    assert recipe.code_digest() not in (first, second)


def test_heads_given_as_a_file_are_stamped_with_their_settings_file(tmp_path):
    """load_heads reads DIR/medusa_heads.json beside DIR/medusa_heads.safetensors: both count."""
    from exporter.recipe import file_stamps

    (tmp_path / "medusa_heads.safetensors").write_bytes(b"w")
    (tmp_path / "medusa_heads.json").write_text("{}")
    (tmp_path / "other.bin").write_bytes(b"x")
    names = [name for name, *_ in file_stamps(tmp_path / "medusa_heads.safetensors")]
    assert names == ["medusa_heads.json", "medusa_heads.safetensors"]
