"""Shared fixtures: the repo root, the shared data folder, tiny random Llama models and the
tiny exported artifacts every session shares (``tiny``: fused; ``tiny_portable``: portable).

Other test files may append fixtures here; keep each one small and documented.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SHARED_DATA = ROOT.parent / "shared" / "data"  # README: tests find it at ../shared/data

# The tests import the packages from this checkout, installed or not.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Test modules in tests/<package>/ import the shared helpers as top-level modules
# (``from conftest import ...``, ``from trt_fakes import ...``; tests/README.md). pytest's
# default import mode puts tests/ on sys.path for this conftest already; this makes it explicit.
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))


# scripts/test.sh (CI) sets this: a test skipped for any reason but a missing GPU fails the run, so
# that a broken environment (a dev dependency missing, importorskip) cannot turn tests into skips
ONLY_GPU_SKIPS = "MEDUSA_TRT_ONLY_GPU_SKIPS"
_skipped: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and "gpu" not in report.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus) -> None:
    import os

    if os.environ.get(ONLY_GPU_SKIPS) == "1" and _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\n{ONLY_GPU_SKIPS}=1: {len(_skipped)} test(s) skipped for reasons other than a missing GPU:")
        for line in _skipped[:20]:
            print(f"  {line}")


@pytest.fixture(autouse=True)
def _no_api_key_from_the_shell(monkeypatch):
    """A developer's exported MEDUSA_API_KEY would make every server the tests start ask for it."""
    monkeypatch.delenv("MEDUSA_API_KEY", raising=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read-only): MT-Bench, the official trees, Alpaca."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"shared data folder {SHARED_DATA} is missing (see the project README: tests read ../shared/data)")
    return SHARED_DATA


TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, like the real backbones
    head_dim=16,  # ONNX Runtime's GroupQueryAttention (the fused graph) takes multiples of 16
    max_position_embeddings=256,
    # A large init spreads the logits: greedy outputs vary (no single repeated token) and
    # argmax near-ties, which float rounding could flip, are rare.
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tiny_causal_lm(
    arch: str = "llama", seed: int = 0, config: dict = TINY_LLAMA, qwen2_bias_std: float = 0.0, **overrides
):
    """A random Llama, Mistral, Qwen2, Qwen3 or Phi-3 causal LM (float32, eval) from ``config`` + ``overrides``,
    seeded (the global torch RNG is left as it was). ``qwen2_bias_std`` > 0 draws Qwen2's q/k/v
    biases from N(0, std) after the init, which zero-initialises them. Qwen3's per-head q/k norm
    weights, which transformers sets to ones, are drawn from 1 + N(0, 0.3): a graph that dropped or
    swapped them would compute something else."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
    }[arch]
    torch.set_num_threads(1)  # tiny models gain nothing from threads; the test machine is shared
    fields = {**config, **overrides}
    if arch == "qwen3":  # Qwen3Config's head_dim defaults to 128, not hidden / heads as the others'
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if arch == "phi3":  # Phi3Config's pad token (32000) lies outside a tiny vocabulary
        fields.setdefault("pad_token_id", 0)
        if "hidden_size" not in overrides and "head_dim" in fields:  # its rope checks take hidden / heads as head_dim
            fields["hidden_size"] = fields["num_attention_heads"] * fields["head_dim"]
    hf_config = cfg_cls(**fields)
    hf_config.architectures = [model_cls.__name__]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(hf_config)
        if arch == "qwen2" and qwen2_bias_std:  # transformers zero-initialises biases: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.data.normal_(0.0, qwen2_bias_std)
        if arch == "qwen3":
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.data.normal_(1.0, 0.3)
    return model.eval()


def make_tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM (float32, eval) from TINY_LLAMA + ``overrides``; seeded."""
    model = make_tiny_causal_lm("llama", seed, **overrides)
    model.generation_config.eos_token_id = None  # tests opt into EOS explicitly
    model.generation_config.pad_token_id = 0
    return model


def random_heads(model, num_heads: int, num_layers: int = 1, shared: bool = True, seed: int = 1):
    """Medusa heads for ``model`` with random (not identity) blocks drawn from N(0, 0.05), seeded."""
    import torch

    from exporter.heads import fresh_heads

    c = model.config
    heads = fresh_heads(
        num_heads, c.hidden_size, c.vocab_size, num_layers=num_layers, shared_lm_head=shared, lm_head=model.lm_head
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in heads.parameters():
            p.data.normal_(0.0, 0.05)
    heads.config.meta = {"layout": "test", "source": "random"}
    return heads


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: ``tiny_llama(seed, **config_overrides)`` -> cached random tiny Llama."""
    cache: dict = {}

    def factory(seed: int = 0, **overrides):
        key = (seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_llama(seed, **overrides)
        return cache[key]

    return factory


def sigterm_after(proc, marker: str) -> tuple[str, str]:
    """SIGTERM to ``proc`` (stderr piped, text) once a line of its stderr holds ``marker``; returns
    the lines read until then and the rest of its stderr, after it exited."""
    import signal

    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return "".join(seen), err


def hf_greedy(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """Hugging Face ``generate(do_sample=False)``: the reference every lossless decode must equal."""
    import torch

    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="session")
def tiny_export():
    """Factory: ``tiny_export(out_dir, seed)`` exports a tiny random Llama whose vocabulary is the
    real SmolLM2 tokenizer's (so chat templates, stop strings and streaming text are real) with
    4 random (not identity) Medusa heads. Returns {artifact, model, heads, num_heads}."""

    def factory(
        out_dir: Path,
        seed: int = 0,
        num_heads: int = 4,
        initializer_range: float = 0.3,
        graph: str = "fused",
        precision: str | None = None,
    ):
        import torch
        from transformers import AutoTokenizer

        from exporter.export import ExportOptions, export_artifact
        from exporter.heads import fresh_heads
        from exporter.models import resolve_model

        folder = resolve_model("smollm2-135m")  # tokenizer only (converted once per machine)
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = make_tiny_llama(
            seed,
            vocab_size=len(tok),
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
            initializer_range=initializer_range,
        )
        heads = fresh_heads(num_heads, model.config.hidden_size, model.config.vocab_size)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 100)
            for p in heads.parameters():
                p.data.normal_(0.0, 0.02)
        export_artifact(
            model, heads, out_dir, ExportOptions(validate=False, graph=graph, precision=precision), tokenizer=tok
        )
        return {"artifact": Path(out_dir), "model": model, "heads": heads, "num_heads": num_heads}

    return factory


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _shared_artifact(art: dict):
    """Yield a session-wide export and check at the session's end that no test wrote into it:
    tests that change an artifact work on a copy (``shutil.copytree(art, tmp_path / ...)``)."""
    before = _digests(art["artifact"])
    yield art
    after = _digests(art["artifact"])
    assert after == before, (
        f"a test changed the shared artifact {art['artifact']} (files differ: "
        f"{sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))}); "
        "copy it with shutil.copytree before changing it"
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_export):
    """The fused float32 tiny export (``tiny_export`` seed 3, the default graph), one per test
    session (per xdist worker), shared and read-only: a test that changes an artifact copies it
    first. A small init makes the tiny model's text repetitive enough for the heads to be right
    often, so the lossless tests see many multi-token steps."""
    yield from _shared_artifact(tiny_export(tmp_path_factory.mktemp("art") / "tiny", seed=3, initializer_range=0.15))


@pytest.fixture(scope="session")
def tiny_portable(tmp_path_factory):
    """The portable float32 tiny export (what TensorRT takes), one per test session, shared and
    read-only like ``tiny``: TINY_LLAMA seed 3 with a 96-token context, 4 fresh (identity)
    heads, tree cpu_8, the 128-word tokenizer; not validated. {artifact, model, heads}."""
    from exporter.export import ExportOptions, export_artifact
    from exporter.heads import fresh_heads

    model = make_tiny_llama(3, max_position_embeddings=96)
    heads = fresh_heads(4, model.config.hidden_size, model.config.vocab_size, lm_head=model.lm_head)
    folder = tmp_path_factory.mktemp("portable") / "tiny"
    export_artifact(
        model,
        heads,
        folder,
        ExportOptions(graph="portable", tree="cpu_8", validate=False),
        tokenizer=make_wordlevel_tokenizer(model.config.vocab_size),
    )
    yield from _shared_artifact({"artifact": folder, "model": model, "heads": heads})


@pytest.fixture(scope="module")
def gen(tiny):
    """``runtime.load`` of the shared ``tiny`` export (ONNX Runtime, 1 thread), one per module."""
    import runtime

    return runtime.load(tiny["artifact"], backend="onnxruntime", threads=1)


def with_chat_template(artifact: Path, folder: Path, template: str) -> Path:
    """A copy of ``artifact`` in ``folder`` with ``template`` as its chat template, the template's checksum
    unrecorded (as a user's edit of the file would leave it)."""
    import json
    import shutil

    shutil.copytree(artifact, folder)
    (folder / "chat_template.jinja").write_text(template)
    cfg_path = folder / "medusa_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["provenance"]["checksums"].pop("chat_template.jinja", None)
    raw["provenance"]["files"].pop("chat_template.jinja", None)
    raw["provenance"].pop("config_sha256", None)
    cfg_path.write_text(json.dumps(raw))
    return folder


def make_wordlevel_tokenizer(vocab_size: int = 128):
    """A fast tokenizer over the words ``t0 .. t{vocab_size-1}`` (t0 unk, t1 bos, t2 eos) with
    a chat template: ``save_pretrained`` writes tokenizer.json, tokenizer_config.json and
    chat_template.jinja like a real one. No file or network access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1", eos_token="t2")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tok


@pytest.fixture(scope="session")
def wordlevel_tokenizer():
    """A 128-word fast tokenizer for tiny random models (see make_wordlevel_tokenizer)."""
    return make_wordlevel_tokenizer(128)


@contextlib.contextmanager
def capture_logs(name: str = "medusa_trt", level: int = logging.DEBUG):
    """The messages logged to ``name`` (and its children) within the block, as a list of
    strings: library code logs (runtime/log.py) instead of taking print callbacks. Works in
    fixtures of any scope, unlike pytest's caplog; the logger's level is restored after."""
    logger = logging.getLogger(name)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(level)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
