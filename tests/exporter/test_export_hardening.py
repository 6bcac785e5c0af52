"""Issue 15's cases for the exporter, one regression test each (tests/runtime/test_hardening.py
holds the runtime's; the numbers are the issue's sections): 4 checkpoints and medusa-export's
command line, 5 interrupted exports (SIGTERM leaves nothing; the next export removes a killed
export's partial folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import sigterm_after  # noqa: E402

from runtime.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- 4. checkpoints


def test_heads_with_nan_weights_fail_at_export_before_any_work(tiny_llama, wordlevel_tokenizer, tmp_path):
    from exporter.export import ExportOptions, export_artifact
    from exporter.heads import fresh_heads

    model = tiny_llama(0)
    heads = fresh_heads(2, 32, 128)
    with torch.no_grad():
        heads.state_dict()["1.0.linear.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"tensor 1.0.linear.weight holds 1 NaN or infinite value"):
        export_artifact(model, heads, tmp_path / "out", ExportOptions(validate=False), tokenizer=wordlevel_tokenizer)
    assert list(tmp_path.iterdir()) == []  # refused before the partial folder


def test_heads_checkpoint_missing_bias_or_holding_nan(tmp_path):
    from safetensors.torch import load_file, save_file

    from exporter.heads import HEADS_WEIGHTS, fresh_heads, load_heads, save_heads

    folder = save_heads(fresh_heads(2, 32, 128), tmp_path / "h")
    sd = load_file(folder / HEADS_WEIGHTS)
    save_file({k: v for k, v in sd.items() if k != "1.0.linear.bias"}, str(folder / HEADS_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"tensor 1.0.linear.bias is missing"):
        load_heads(folder, hidden_size=32, vocab_size=128)
    sd["0.0.linear.bias"][3] = float("inf")
    save_file(sd, str(folder / HEADS_WEIGHTS))
    with pytest.raises(CheckpointError, match=r"tensor 0.0.linear.bias holds NaN or infinite values"):
        load_heads(folder, hidden_size=32, vocab_size=128)


# ---------------------------------------------------------------------------- 4. command lines


def _one_line_error(capsys, rc, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def test_export_cli_refuses_non_finite_numbers(tmp_path, capsys):
    from exporter.cli import main

    rc = main(["smollm2-135m", "-o", str(tmp_path / "x"), "--external-data-threshold-mb", "nan"])
    assert "--external-data-threshold-mb must be a finite number" in _one_line_error(capsys, rc, "medusa-export")
    assert not (tmp_path / "x").exists()


def test_force_replaces_only_an_artifact_or_an_empty_folder(tmp_path):
    """--force must never delete a folder that is not an earlier artifact (a user's data)."""
    from exporter.export import check_out_dir
    from runtime.artifact import CONFIG_FILE
    from runtime.errors import ArtifactError

    data = tmp_path / "userdata"
    data.mkdir()
    (data / "important.txt").write_text("keep")
    with pytest.raises(
        ArtifactError, match="is not a medusa-trt artifact .* --force replaces only an earlier artifact"
    ):
        check_out_dir(data, force=True)
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        check_out_dir(data, force=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", force=True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CONFIG_FILE).write_text("{}")
    check_out_dir(tmp_path / "old", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "file", force=False)
    assert (data / "important.txt").read_text() == "keep"


def test_force_keeps_the_files_an_export_did_not_write(tmp_path):
    """An earlier artifact holding files no export writes (an engine trtexec built, notes): --force
    refuses, naming them, and deletes nothing (the README: never a user's files)."""
    import json

    from exporter.export import check_out_dir
    from runtime.artifact import CONFIG_FILE
    from runtime.errors import ArtifactError

    old = tmp_path / "old"
    old.mkdir()
    (old / CONFIG_FILE).write_text(json.dumps({"backbone": {"file": "model.onnx"}, "heads": {"file": "heads.onnx"}}))
    for name in ("model.onnx", "model.onnx.data", "heads.onnx", "tokenizer.json", "model.engine", "notes.txt"):
        (old / name).write_text("x")
    with pytest.raises(ArtifactError, match=r"holds files medusa-export did not write \(model.engine, notes.txt\)"):
        check_out_dir(old, force=True)
    assert sorted(p.name for p in old.iterdir()) == sorted(
        [CONFIG_FILE, "model.onnx", "model.onnx.data", "heads.onnx", "tokenizer.json", "model.engine", "notes.txt"]
    )
    (old / "model.engine").unlink()
    (old / "notes.txt").unlink()
    check_out_dir(old, force=True)  # only what an export wrote: replaced


def test_an_interrupt_while_force_replaces_an_artifact_puts_the_previous_one_back(tmp_path, monkeypatch):
    """--force moves the previous artifact aside, then the new one in. An interrupt (SIGTERM becomes one)
    that lands just after the first rename, or a failing second one, leaves the previous artifact where it
    was: it is deleted only after the new one is in place."""
    import shutil

    import exporter.export as ex

    out = tmp_path / "art"
    real = os.replace
    for fail_on in ("aside", "into place"):
        out.mkdir(exist_ok=True)
        (out / "model.onnx").write_text("previous")
        new = tmp_path / "new"
        new.mkdir()
        (new / "model.onnx").write_text("new")

        def replace(src, dst, fail_on=fail_on, new=new):
            if fail_on == "aside" and Path(src) == out:
                real(src, dst)  # the rename happened; the interrupt comes as it returns
                raise KeyboardInterrupt
            if fail_on == "into place" and Path(src) == new:
                raise OSError("simulated: the disk is full")
            return real(src, dst)

        monkeypatch.setattr(ex.os, "replace", replace)
        with pytest.raises((KeyboardInterrupt, OSError)):
            ex._move_into_place(new, out, force=True)
        monkeypatch.setattr(ex.os, "replace", real)
        assert (out / "model.onnx").read_text() == "previous", fail_on
        assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]  # the aside folder went, after the restore
        shutil.rmtree(new)


def test_a_context_below_two_is_refused_before_any_work_and_a_tiny_one_validates(tmp_path, wordlevel_tokenizer,
                                                                                tiny_llama):  # fmt: skip
    """--max-context 1 leaves no room for a token after the prompt's: refused with the options (runtime.artifact
    reads at least 2), not after the graphs are built; 4 exports, its batch graph validated with calls that fit
    the rotary tables (before: ONNX Runtime's 'Updating cos_cache ... is not currently supported')."""
    from exporter.export import ExportOptions, check_options, export_artifact
    from exporter.heads import fresh_heads
    from runtime.artifact import read_artifact
    from runtime.errors import MedusaError

    with pytest.raises(MedusaError, match="--max-context must be an integer >= 2"):
        check_options(ExportOptions(max_context=1))
    model = tiny_llama(0)
    heads = fresh_heads(2, model.config.hidden_size, model.config.vocab_size)
    out = export_artifact(model, heads, tmp_path / "ctx4", ExportOptions(max_context=4, validation_threads=1),
                          tokenizer=wordlevel_tokenizer)  # fmt: skip
    cfg = read_artifact(out)
    assert cfg.model.max_context == 4 and cfg.provenance["validation"]["passed"]


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    from exporter.cli import main

    rc = main(["smollm2-135m", "-o", "/proc/medusa-trt-test/x"])  # /proc takes no new folder, even from root
    assert "cannot write /proc/medusa-trt-test/x" in _one_line_error(capsys, rc, "medusa-export")


def test_a_model_folder_whose_weights_are_truncated_is_one_line(hf_folder, tmp_path, capsys):
    import shutil

    from exporter.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(hf_folder, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted download
    rc = main([str(broken), "--fresh-heads", "2", "-o", str(tmp_path / "x")])
    assert f"cannot load the model {broken}" in _one_line_error(capsys, rc, "medusa-export")
    assert not (tmp_path / "x").exists()


def test_missing_heads_unknown_trees_a_long_context_and_no_tokenizer_are_named_before_the_model_loads(
    hf_folder, tmp_path, capsys, monkeypatch
):
    import exporter.models
    from exporter.cli import main

    def never(*a, **k):
        raise AssertionError("the backbone loaded first")

    monkeypatch.setattr(exporter.models, "load_backbone", never)
    rc = main([str(hf_folder), "--heads", str(tmp_path / "nosuch"), "-o", str(tmp_path / "x")])
    assert "Medusa heads not found" in _one_line_error(capsys, rc, "medusa-export")
    rc = main([str(hf_folder), "--fresh-heads", "2", "--tree", "nosuchtree", "-o", str(tmp_path / "x")])
    assert "unknown tree 'nosuchtree'" in _one_line_error(capsys, rc, "medusa-export")
    rc = main([str(hf_folder), "--fresh-heads", "2", "--max-context", "100000", "-o", str(tmp_path / "x")])
    assert "--max-context 100000 exceeds the model's max_position_embeddings" in _one_line_error(
        capsys, rc, "medusa-export"
    )
    import shutil

    bare = tmp_path / "bare"  # the weights without the tokenizer's files
    shutil.copytree(hf_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    rc = main([str(bare), "--fresh-heads", "2", "-o", str(tmp_path / "x")])
    assert f"{bare} has no tokenizer" in _one_line_error(capsys, rc, "medusa-export")
    assert not (tmp_path / "x").exists()


def test_export_cli_refuses_a_datastore_that_is_not_one(tmp_path, capsys):
    from exporter.cli import main

    text = tmp_path / "prompts.jsonl"
    text.write_text('{"prompt": "hi"}\n')
    rc = main(["smollm2-135m", "-o", str(tmp_path / "x"), "--datastore", str(text)])
    assert "is not a datastore.npz" in _one_line_error(capsys, rc, "medusa-export")
    assert not (tmp_path / "x").exists()
    import numpy as np

    other = tmp_path / "other.npz"  # a numpy archive, but no datastore: named before the model loads
    np.savez(other, weights=np.zeros(3))
    rc = main(["smollm2-135m", "-o", str(tmp_path / "x"), "--datastore", str(other)])
    assert "not a readable datastore" in _one_line_error(capsys, rc, "medusa-export")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- 5. interrupted exports


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder (what medusa-export reads)."""
    from conftest import make_tiny_llama, make_wordlevel_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "tiny"
    make_tiny_llama(0).save_pretrained(folder)
    make_wordlevel_tokenizer(128).save_pretrained(folder)
    return folder


def test_sigterm_during_export_leaves_nothing(hf_folder, tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", str(hf_folder), "--fresh-heads", "2", "-o", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        # SIGTERM once the export is saving its graphs into the partial folder
        if any((p / "model.onnx").exists() for p in tmp_path.glob(".art.partial-*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "medusa-export: terminated (SIGTERM); nothing was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no .partial-*, no temporaries, no artifact


def test_sigterm_while_the_model_loads_says_so_too(tmp_path):
    """SIGTERM before any graph is written (the seconds the model takes to load) is the same one
    line and exit 143, not a silent death by the signal."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "smollm2-135m", "-vv", "-o", str(tmp_path / "art")],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    seen, err = sigterm_after(proc, "loading smollm2-135m")  # the load's first log line: the model is loading
    assert proc.returncode == 143, seen + err
    assert err.strip().splitlines()[-1] == "medusa-export: terminated (SIGTERM); nothing was written", err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_next_export_removes_a_killed_exports_partial_folder(tiny_llama, wordlevel_tokenizer, tmp_path):
    from exporter.export import OWNER_FILE, ExportOptions, export_artifact
    from exporter.heads import fresh_heads

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = __import__("socket").gethostname()
    stale = tmp_path / ".art.partial-killed"  # what a SIGKILL'd export leaves
    (stale / ".tmp").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"\0" * 4096)
    (stale / OWNER_FILE).write_text(f"{dead.stdout.strip()} {host}\n")
    live = tmp_path / ".art.partial-running"  # another export, still running: kept
    live.mkdir()
    (live / OWNER_FILE).write_text(f"{os.getpid()} {host}\n")
    other = tmp_path / ".other.partial-x"  # another destination's: not ours to touch
    other.mkdir()
    seen_tmp = []
    from conftest import capture_logs

    import exporter.quantize as quantize

    original = quantize.quantize_heads

    def spy(folder, config):  # where ONNX Runtime's quantizer puts its temporary folder
        import tempfile

        seen_tmp.append(Path(tempfile.gettempdir()))
        return original(folder, config)

    quantize.quantize_heads = spy
    try:
        with capture_logs() as logs:
            export_artifact(
                tiny_llama(0),
                fresh_heads(2, 32, 128),
                tmp_path / "art",
                ExportOptions(validate=False),
                tokenizer=wordlevel_tokenizer,
            )
    finally:
        quantize.quantize_heads = original
    assert any(line.startswith(f"removed {stale}, left by an interrupted export") for line in logs)
    assert not stale.exists() and live.exists() and other.exists()
    assert seen_tmp and seen_tmp[0].parent.name.startswith(".art.partial-") and seen_tmp[0].name == ".tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.partial-running", ".other.partial-x", "art"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "art").iterdir())
