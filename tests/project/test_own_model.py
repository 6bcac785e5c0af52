"""README's "Your own model" recipe, run as written on a tiny stand-in: a random Llama saved as a
Hugging Face folder (untied lm_head, like Vicuna) and Medusa-1 heads in exactly the layout
FasterDecoding publishes (FasterDecoding/medusa-vicuna-7b-v1.3: ``config.json`` with
``medusa_num_heads`` / ``medusa_num_layers`` / ``base_model_name_or_path``, and
``medusa_lm_head.pt`` or ``.safetensors`` with ``{i}.0.linear.weight`` [H, H],
``{i}.0.linear.bias`` [H] and ``{i}.1.weight`` [V, H] per head; bfloat16 in the ``.pt``, as
FasterDecoding's train_legacy.py saves it, float16 in the ``.safetensors``). The commands are read
from the README and run with the tiny folders in place of the 7B ones; greedy Medusa on each
artifact must equal plain greedy decoding (and Hugging Face ``generate``)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, make_tiny_llama

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the repository
SECTION = "## Your own model"
MODEL, HEADS = "vicuna-7b-v1.3", "medusa-vicuna-7b-v1.3"  # the folder names the README's commands use
NUM_HEADS = 5  # what FasterDecoding's Vicuna-7B checkpoint holds; its config.json says 2
PROMPTS = [[1, 17, 42, 99, 5], [1, 3, 3, 8, 64, 12, 77, 30], [1, 120, 7]]


def readme_commands() -> list[list[str]]:
    """The medusa-export / medusa-run lines of the README section's first bash block, as argv lists."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    out = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith(("medusa-export", "medusa-run")):
            out.append(shlex.split(line))
    return out


def write_fasterdecoding_heads(folder: Path, model, fmt: str, seed: int = 1) -> Path:
    """Medusa-1 heads as FasterDecoding publishes them: each head one ResBlock and its own
    vocabulary projection (initialised from the backbone's lm_head, as their training does)."""
    H, V = model.config.hidden_size, model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if fmt == "pt" else torch.float16
    sd = {}
    for i in range(NUM_HEADS):
        sd[f"{i}.0.linear.weight"] = (0.05 * torch.randn(H, H, generator=g)).to(dtype)
        sd[f"{i}.0.linear.bias"] = (0.05 * torch.randn(H, generator=g)).to(dtype)
        sd[f"{i}.1.weight"] = (model.lm_head.weight.detach() + 0.05 * torch.randn(V, H, generator=g)).to(dtype)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
                "medusa_num_heads": 2,
                "medusa_num_layers": 1,
                "transformers_version": "4.31.0",
            },
            indent=2,
        )
    )
    if fmt == "pt":
        torch.save(sd, folder / "medusa_lm_head.pt")
    else:
        from safetensors.torch import save_file

        save_file(sd, str(folder / "medusa_lm_head.safetensors"))
    return folder


@pytest.fixture(scope="module")
def vicuna_like(tmp_path_factory, wordlevel_tokenizer):
    """A tiny random Llama with Vicuna's untied lm_head, saved as a Hugging Face folder."""
    model = make_tiny_llama(seed=5, tie_word_embeddings=False, initializer_range=0.15)
    folder = tmp_path_factory.mktemp("own") / MODEL
    model.save_pretrained(str(folder))
    wordlevel_tokenizer.save_pretrained(str(folder))
    return model, folder


def test_the_readme_recipe_is_there():
    cmds = readme_commands()
    exports = [c for c in cmds if c[0] == "medusa-export" and c[1] not in ("trtexec", "build-engine")]
    assert len(exports) == 2, cmds  # CPU (fused) and GPU (portable, float16)
    for c in exports:
        assert c[1] == MODEL and c[c.index("--heads") + 1] == HEADS, c
    assert any("--graph" in c and c[c.index("--graph") + 1] == "portable" for c in exports)
    assert any(c[:2] == ["medusa-export", "trtexec"] for c in cmds)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_readme_recipe_on_fasterdecoding_layout(fmt, vicuna_like, tmp_path, capsys):
    import runtime
    from exporter import cli as export_cli
    from runtime import cli as run_cli

    model, model_dir = vicuna_like
    heads_dir = write_fasterdecoding_heads(tmp_path / HEADS, model, fmt)
    names = {MODEL: str(model_dir), HEADS: str(heads_dir)}

    def local(arg: str) -> str:
        if arg in names:
            return names[arg]
        return str(tmp_path / arg[len("artifacts/") :]) if arg.startswith("artifacts/") else arg

    artifacts, skipped = [], set()
    for argv in readme_commands():
        argv = [local(a) for a in argv]
        if skipped & set(argv):
            continue
        if argv[0] == "medusa-export":
            if fmt == "safetensors" and "--graph" in argv:
                skipped.add(argv[argv.index("-o") + 1])  # the heads file format matters for loading only:
                continue  # one export of it is enough
            assert export_cli.main(argv[1:]) == 0, capsys.readouterr().err
            if argv[1] not in ("trtexec", "build-engine"):
                artifacts.append(Path(argv[argv.index("-o") + 1]))
        elif argv[0] == "medusa-run" and "tensorrt" not in argv:  # no GPU here: TensorRT is not run
            assert run_cli.main(argv[1:]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert artifacts

    for art in artifacts:
        cfg = json.loads((art / "medusa_config.json").read_text())
        heads = cfg["provenance"]["heads"]
        assert heads["layout"] == f"medusa1-{fmt}" and heads["num_heads"] == NUM_HEADS  # the weights, not config.json
        assert heads["shared_lm_head"] is False and cfg["provenance"]["validation"]["passed"]
        gen = runtime.load(art, backend="onnxruntime", threads=1)
        for ids in PROMPTS:
            plain = gen.generate(ids, max_new_tokens=24, medusa=False)
            medusa = gen.generate(ids, max_new_tokens=24)
            assert medusa.tokens == plain.tokens, (art.name, ids)
            assert medusa.stats.steps < plain.stats.steps  # drafts were accepted
            if cfg["dtype"] == "float32":
                assert plain.tokens == hf_greedy(model, ids, 24), (art.name, ids)
