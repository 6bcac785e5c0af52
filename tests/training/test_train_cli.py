"""training/cli.py (``medusa-train``): user errors are one line on stderr, exit 1, before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_helpers import synthetic_records as _records
from train_helpers import tiny_llama

from runtime.errors import MedusaError


def test_cli_user_error_exits_1_with_one_message(tmp_path, capsys):
    from training.cli import main
    from training.distill import write_atomic

    rc = main(["medusa1", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "missing.jsonl does not exist" in capsys.readouterr().err
    rc = main(["medusa1", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 1 and "is a folder, not a file" in capsys.readouterr().err
    rc = main(["distill", "--prompts", str(tmp_path), "--out", str(tmp_path / "d2.jsonl")])
    assert rc == 1 and "is a folder, not a file" in capsys.readouterr().err
    write_atomic(tmp_path / "d.jsonl", _records(2))
    rc = main(
        [
            "medusa1",
            "--model",
            str(tmp_path / "no_model"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("medusa-train: error:") and "Traceback" not in err
    assert "no_model" in err


def test_medusa1_refuses_data_without_held_out_examples(tmp_path, capsys):
    """Too few records for a held-out split: one clear line before any work, not a 0.000 accuracy
    table for an empty held-out set."""
    from training.cli import main
    from training.data import split_of
    from training.distill import write_atomic
    from training.medusa1 import Medusa1Config, train_medusa1

    records = [r for r in _records(40) if split_of(r["id"]) == "train"][:12]
    write_atomic(tmp_path / "d.jsonl", records)
    model_dir = tmp_path / "model"  # the model is checked first; it is never loaded here
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    rc = main(["medusa1", "--model", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "too little data" in err and "12 records give 12 training and 0 held-out examples" in err
    assert "medusa-train distill --num-prompts" in err and "0 more for calibration" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(MedusaError, match="0 held-out examples"):
        train_medusa1(
            Medusa1Config(model="tiny", data=tmp_path / "d.jsonl", out=tmp_path / "o"),
            backbone=(tiny_llama(), None, tmp_path),
        )


def _one_line_error(capsys, rc, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def test_train_cli_refuses_non_finite_numbers(tmp_path, capsys):
    from training.cli import main

    rc = main(["distill", "--temperature", "nan", "--out", str(tmp_path / "d.jsonl")])
    assert "--temperature must be a finite number" in _one_line_error(capsys, rc, "medusa-train")
    rc = main(["medusa1", "--data", "x", "--out", str(tmp_path / "h"), "--lr", "inf"])
    assert "--lr must be a finite number" in _one_line_error(capsys, rc, "medusa-train")
    assert not (tmp_path / "h").exists()


def test_datastore_is_built_from_the_train_split_only(tmp_path, capsys):
    import json

    from runtime.datastore import Datastore
    from training.cli import main
    from training.data import split_of
    from training.distill import write_atomic

    recs = _records(60)
    held = [r for r in recs if split_of(r["id"]) != "train"]
    assert held  # the synthetic ids fall into every split
    for r in held:  # answers outside the train split: a pattern that must not reach the store
        r["response_ids"] = [7, 8, 9, 10] * 3
    write_atomic(tmp_path / "d.jsonl", recs)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 512, "architectures": ["LlamaForCausalLM"]}))
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "datastore.npz" in out and "train split" in out
    ds = Datastore.load(tmp_path / "datastore.npz", vocab_size=512)
    assert ds.meta["sequences"] == len(recs) - len(held)
    assert ds.propose([7, 8], 2) != [9, 10]  # the held-out answers' 4-cycle is not in it
    step = [r for r in recs if split_of(r["id"]) == "train"][0]["response_ids"]
    assert ds.propose(step[:3], 2) == step[3:5]  # the train answers' counting is

    new = tmp_path / "new" / "ds.npz"
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(new)])
    assert rc == 0 and new.is_file()  # a missing folder is made
    capsys.readouterr()
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])
    assert rc == 1 and "none.jsonl: no such file" in capsys.readouterr().err
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--split", "test"])
    assert rc == 1 and "--split must be one of" in capsys.readouterr().err
    empty = tmp_path / "empty"
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(empty / "x.npz"),
               "--min-count", "100000"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "nothing to draft from" in err and not (empty / "x.npz").exists(), err


def _fake_model(folder, vocab_size: int = 512):
    """A model folder that is only resolved (its config.json), never loaded."""
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab_size, "architectures": ["LlamaForCausalLM"]}))
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["medusa1", "--max-steps", "-1"], "--max-steps must be an integer >= 0 (0: no limit), got -1"),
        (["medusa1", "--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["medusa1", "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["medusa1", "--max-train-tokens", "-5"], "--max-train-tokens must be an integer >= 0"),
        (["medusa1", "--num-heads", "9"], "--num-heads must be an integer in [1, 8]"),
        (["medusa1", "--batch-tokens", "0"], "--batch-tokens must be an integer >= 1, got 0"),
        (["medusa2", "--lr-backbone", "-1"], "--lr-backbone must be > 0, got -1.0"),
        (["medusa2", "--lr-heads", "-1"], "--lr-heads must be > 0"),
        (["medusa2", "--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0"),
        (["medusa2", "--max-len", "0"], "--max-len must be an integer >= 2"),
        (["medusa2", "--head-weight", "-0.5"], "--head-weight must be >= 0.0"),
        (["distill", "--num-prompts", "-3"], "--num-prompts must be an integer >= 1"),
        (["datastore", "--max-ngram", "0"], "--max-ngram must be an integer >= 1"),
        (["select-tree", "--max-nodes", "0"], "--max-nodes must be an integer in [1, "),
        (["select-tree", "--max-rank", "0"], "--max-rank must be an integer >= 1, got 0"),
        (["select-tree", "--heads-cost", "-1"], "--heads-cost must be >= 0"),
    ],
)
def test_every_numeric_flag_is_checked_before_any_work(tmp_path, capsys, argv, message):
    """A negative --max-steps once saved untrained heads as a success, --lr -1 ended in torch's
    ValueError after the model loaded: every numeric flag is one line, before the model (a missing
    one here) is even looked up, and nothing is written."""
    from training.cli import main

    paths = {
        "medusa1": ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")],
        "medusa2": ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")],
        "distill": ["--out", str(tmp_path / "o" / "d.jsonl")],
        "datastore": ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")],
        "select-tree": ["--data", str(tmp_path / "d.jsonl"), "--out-dir", str(tmp_path / "o")],
    }[argv[0]]
    rc = main([*argv, *paths, "--model", str(tmp_path / "no_model")])
    line = _one_line_error(capsys, rc, "medusa-train")
    assert message in line and "no_model" not in line, line
    assert not (tmp_path / "o").exists()


def test_medusa1_api_refuses_negative_steps_and_rates(tmp_path):
    from training.medusa1 import Medusa1Config, train_medusa1

    for bad, match in (({"max_steps": -1}, "max_steps"), ({"lr": -1.0}, "lr"), ({"max_train_tokens": -5}, "max_train")):
        with pytest.raises(MedusaError, match=match):
            train_medusa1(Medusa1Config(model="tiny", data=tmp_path / "d.jsonl", out=tmp_path / "o", **bad))
    assert not (tmp_path / "o").exists()


def test_select_tree_default_heads_are_found_from_any_folder(tmp_path, monkeypatch):
    """The default --heads was the relative exporter/shipped_heads/...: 'Medusa heads not found'
    from any other working folder, after the model loaded."""
    from training.cli import build_parser, select_config
    from training.select_tree import SelectConfig

    monkeypatch.chdir(tmp_path)
    heads = Path(select_config(build_parser().parse_args(["select-tree", "--data", "d.jsonl"])).heads)
    assert heads == Path(SelectConfig().heads) and heads.is_absolute()
    assert (heads / "medusa_heads.safetensors").is_file() and (heads / "medusa_heads.json").is_file()


def _select_argv(repo_root, tmp_path, *extra):
    return [
        "select-tree",
        "--accuracy-from",
        str(repo_root / "tree_configs" / "smollm2_ort_cpu.json"),
        "--out-dir",
        str(tmp_path / "trees"),
        *extra,
    ]


@pytest.mark.parametrize(
    "relative_cost, message",
    [
        ({"1": float("nan"), "8": float("nan")}, "needs positive costs for N = 1 and up"),
        ({"2": 1.0, "8": 1.5}, "needs positive costs for N = 1 and up"),
        ({"1": 1.0, "8": float("inf")}, "needs positive costs for N = 1 and up"),
    ],
)
def test_select_tree_refuses_cost_profiles_the_runtime_refuses(tmp_path, repo_root, capsys, relative_cost, message):
    """A NaN profile gave 'predicted speedup nanx' and a tree; one without N = 1 a speedup from
    nothing. The runtime's own rules (runtime.dynamic.CostModel) refuse both: so does select-tree."""
    import json

    from training.cli import main

    prof = tmp_path / "prof.json"
    prof.write_text(json.dumps({"backend": "x", "relative_cost": relative_cost}))
    rc = main(_select_argv(repo_root, tmp_path, "--profile", str(prof)))
    assert message in _one_line_error(capsys, rc, "medusa-train")
    assert not (tmp_path / "trees").exists()


def test_select_tree_name_and_out_dir_are_checked_first(tmp_path, repo_root, capsys):
    from training.cli import main

    profile = str(repo_root / "docs" / "results" / "latency_profile.json")
    for name in ("../../x", "a/b", ".."):
        rc = main(_select_argv(repo_root, tmp_path, "--profile", profile, "--name", name))
        assert "--name must be a plain name" in _one_line_error(capsys, rc, "medusa-train")
    assert not list(tmp_path.rglob("*.json"))
    file = tmp_path / "file"
    file.write_text("")
    rc = main([*_select_argv(repo_root, tmp_path, "--profile", profile)[:-2], "--out-dir", str(file)])
    assert f"--out-dir {file} is a file, not a folder" in _one_line_error(capsys, rc, "medusa-train")
    rc = main([*_select_argv(repo_root, tmp_path, "--profile", profile)[:-2], "--out-dir", str(file / "sub")])
    assert f"{file} is a file, so no folder can be made there" in _one_line_error(capsys, rc, "medusa-train")


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    """medusa1 --out FILE once trained and then hit FileExistsError; distill --out FOLDER blamed
    missing distilled data (which distill itself writes)."""
    import json

    from training.cli import main
    from training.distill import write_atomic

    write_atomic(tmp_path / "d.jsonl", _records(2))
    model = _fake_model(tmp_path / "model")
    file = tmp_path / "file"
    file.write_text("keep")
    for cmd in ("medusa1", "medusa2"):
        rc = main([cmd, "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(file)])
        assert f"--out {file} is a file, not a folder" in _one_line_error(capsys, rc, "medusa-train")
    assert file.read_text() == "keep"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"instruction": "say hi"}]))
    folder = tmp_path / "folder"
    folder.mkdir()
    argv = ["distill", "--model", str(tmp_path / "no_model"), "--prompts", str(prompts), "--num-prompts", "1"]
    rc = main([*argv, "--out", str(folder)])
    line = _one_line_error(capsys, rc, "medusa-train")
    assert f"--out {folder} is a folder" in line and "run `medusa-train distill` first" not in line
    rc = main([*argv, "--out", str(file / "d.jsonl")])
    assert "is a file, so no folder can be made there" in _one_line_error(capsys, rc, "medusa-train")
    rc = main(["datastore", "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--out", str(file / "x.npz")])
    assert "is a file, so no folder can be made there" in _one_line_error(capsys, rc, "medusa-train")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_outputs_where_nothing_can_be_written_are_refused_before_the_work(tmp_path, repo_root, capsys):
    """A place the system refuses (here /proc; a read-only or foreign folder alike) trained first, then
    raised FileNotFoundError / PermissionError from save_heads or save_states."""
    from training.cli import main
    from training.distill import write_atomic

    write_atomic(tmp_path / "d.jsonl", _records(2))
    model = _fake_model(tmp_path / "model")
    data = str(tmp_path / "d.jsonl")
    runs = {
        "medusa1": ["medusa1", "--model", str(model), "--data", data, "--out", "/proc/medusa-trt-heads"],
        "medusa2": ["medusa2", "--model", str(model), "--data", data, "--out", "/proc/medusa-trt-model"],
        "distill": ["distill", "--model", str(tmp_path / "no_model"), "--prompts", data, "--out", "/proc/d.jsonl"],
        "datastore": ["datastore", "--model", str(model), "--data", data, "--out", "/proc/x.npz"],
        "select-tree": [*_select_argv(repo_root, tmp_path)[:-2], "--out-dir", "/proc/trees"],
    }
    for cmd, argv in runs.items():
        line = _one_line_error(capsys, main(argv), "medusa-train")
        assert "cannot write" in line and "/proc" in line, (cmd, line)


@pytest.mark.parametrize(
    "content, where",
    [
        (b"\xff\xfe[\x00]\x00", "line 1 is not UTF-8 text (byte 0xff) (it starts with a UTF-16 byte-order mark)"),
        (
            b'{"id": "r0", "prompt_ids": [1], "response_ids": [2]}\n{"caf\xe9": 1}\n',
            "line 2 is not UTF-8 text (byte 0xe9)",
        ),
    ],
    ids=["utf16-bom", "latin1"],
)
def test_input_files_that_are_not_utf8_are_one_line(tmp_path, capsys, content, where):
    from training.cli import main

    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    model = _fake_model(tmp_path / "model")
    out = str(tmp_path / "o")
    for argv in (
        ["distill", "--model", str(model), "--prompts", str(bad), "--num-prompts", "1", "--out", out + ".jsonl"],
        ["medusa1", "--model", str(model), "--data", str(bad), "--out", out],
        ["datastore", "--model", str(model), "--data", str(bad), "--out", out + ".npz"],
    ):
        rc = main(argv)
        assert f"{bad}: {where}" in _one_line_error(capsys, rc, "medusa-train"), argv


def test_alpaca_input_null_is_absent_and_a_number_is_refused(tmp_path, capsys):
    import json

    from training.cli import main
    from training.distill import load_prompts

    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"instruction": "a", "input": None}, {"instruction": "b", "input": " x "}]))
    assert load_prompts(p) == [("alpaca-00000", "a"), ("alpaca-00001", "b\n\nx")]
    p.write_text(json.dumps([{"instruction": "a"}, {"instruction": "b", "input": 3}]))
    argv = ["distill", "--model", str(tmp_path / "no_model"), "--prompts", str(p), "--num-prompts", "2"]
    rc = main([*argv, "--out", str(tmp_path / "d.jsonl")])
    line = _one_line_error(capsys, rc, "medusa-train")
    assert "record 1 (alpaca-00001) has 'input' 3: it must be a string" in line
    p.write_text(json.dumps([{"instruction": None}]))
    with pytest.raises(MedusaError, match="record 0 .* has 'instruction' None"):
        load_prompts(p)


def test_datastore_written_into_an_artifact_updates_its_record(tiny, tmp_path, capsys):
    """An artifact exported with a datastore records its size and sha256; `medusa-train datastore
    --out ARTIFACT` replaced the file but not the record, and every later load failed ('datastore.npz
    is N bytes but the export wrote M'). The record is updated with the file: the artifact loads,
    verifies and decodes with the new store."""
    import json
    import shutil

    import runtime
    from runtime.artifact import CONFIG_FILE, read_artifact, record_checksums
    from runtime.datastore import Datastore
    from training.cli import main
    from training.distill import write_atomic

    art = tmp_path / "art"
    shutil.copytree(tiny["artifact"], art)
    vocab = read_artifact(art).model.vocab_size
    Datastore.build([[5, 6, 7, 8] * 4], vocab).save(art / "datastore.npz")  # as an export with --datastore
    cfg = json.loads((art / CONFIG_FILE).read_text())
    cfg["provenance"]["checksums"] = record_checksums(art)
    (art / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    read_artifact(art, verify=True)

    write_atomic(tmp_path / "d.jsonl", _records(60))
    rc = main(["datastore", "--model", str(_fake_model(tmp_path / "m", vocab)), "--data", str(tmp_path / "d.jsonl"),
               "--out", str(art)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    read_artifact(art, verify=True)
    prov = json.loads((art / CONFIG_FILE).read_text())["provenance"]
    assert prov["checksums"]["datastore.npz"] == record_checksums(art)["datastore.npz"]
    assert prov["datastore"]["sequences"] == Datastore.load(art / "datastore.npz").meta["sequences"]
    assert not [p.name for p in art.iterdir() if p.name.startswith(".")]  # no temporary file stays
    gen = runtime.load(art, threads=1)
    try:
        assert gen.datastore is not None
        assert len(gen.generate([1, 5, 6, 7], max_new_tokens=4).tokens) == 4
    finally:
        gen.close()
    rc = main(["datastore", "--model", str(_fake_model(tmp_path / "m2", 512)), "--data", str(tmp_path / "d.jsonl"),
               "--out", str(art)])  # fmt: skip
    assert "an artifact of a model with" in _one_line_error(capsys, rc, "medusa-train")
    read_artifact(art, verify=True)


@pytest.mark.parametrize("flag, shown", [("-q", False), (None, True)])
def test_quiet_hides_the_hugging_face_progress_bars_too(tmp_path, repo_root, monkeypatch, capsys, flag, shown):
    """-q ("no progress bars") left transformers' "Loading weights" bar on stderr at every model load."""
    from transformers.utils import logging as hf_logging

    import training.cli

    seen = []

    def check_numbers(args):
        seen.append(hf_logging.is_progress_bar_enabled())
        raise MedusaError("stop here")

    monkeypatch.setattr(training.cli, "check_numbers", check_numbers)
    before = hf_logging.is_progress_bar_enabled()
    argv = [*_select_argv(repo_root, tmp_path), *([flag] if flag else [])]
    assert training.cli.main(argv) == 1
    assert "stop here" in capsys.readouterr().err
    assert seen == [shown and before] and hf_logging.is_progress_bar_enabled() == before


def test_medusa2_names_prompts_longer_than_max_len(tmp_path):
    """medusa2 --max-len 32 on prompts of ~70 tokens said "no training examples", no more."""
    from train_helpers import tiny_llama

    from training.data import split_of
    from training.distill import write_atomic
    from training.medusa2 import Medusa2Config, train_medusa2

    records = [r for r in _records(40) if split_of(r["id"]) == "train"][:12]
    write_atomic(tmp_path / "d.jsonl", records)
    assert min(len(r["prompt_ids"]) for r in records) >= 6  # none leaves an answer token within 6
    cfg = Medusa2Config(model="tiny", data=tmp_path / "d.jsonl", out=tmp_path / "o", num_heads=2, steps=1, max_len=6)
    with pytest.raises(MedusaError) as e:
        train_medusa2(cfg, backbone=(tiny_llama(), None, tmp_path))
    assert "12 records, 12 whose prompt is --max-len 6 tokens or longer (raise --max-len) gave none" in str(e.value)
