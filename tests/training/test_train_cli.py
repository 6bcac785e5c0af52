"""training/cli.py (``medusa-train``): user errors are one line on stderr, exit 1, before any work."""

from __future__ import annotations

import pytest
from train_helpers import synthetic_records as _records
from train_helpers import tiny_llama

from runtime.errors import MedusaError


def test_cli_user_error_exits_1_with_one_message(tmp_path, capsys):
    from training.cli import main
    from training.distill import write_atomic

    rc = main(["medusa1", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "missing.jsonl does not exist" in capsys.readouterr().err
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
    assert "medusa-train distill --num-prompts" in err
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
