#!/usr/bin/env python
"""Device check for the TensorRT path (issue 6): PASS/FAIL lines, non-zero exit on failure.

    python -m scripts.device_check [--workdir DIR] [--keep]     # from the repository root
    python -m pytest -q -m gpu tests/gpu                         # the same stages as pytest tests

Stage 1 needs torch with CUDA (and transformers): a tiny random Llama with Medusa heads
runs through the PyTorch reference backend on the GPU; Medusa greedy must equal plain
greedy and Hugging Face ``generate``.

Stage 2 needs ``tensorrt`` too: export the tiny model (exporter.export.export_artifact),
build both engines from the plan (exporter.trt_build), compare TensorRT with ONNX Runtime
on every profile with Polygraphy (the artifact's polygraphy_check.sh), then decode on
TensorRT: Medusa greedy must equal plain greedy for a short prompt, a prompt longer than
the prefill chunk (chunked prefill) and a run to the end of the context (past the verify
profile's reach the loop takes plain steps on the decode profile).

Exit status: 0 every check passed; 1 a check failed; 2 a stage could not run here
(no CUDA, no transformers, no tensorrt), after running what could run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MAX_CONTEXT, MAX_PROMPT, TREE = 256, 32, "cpu_8"
failures: list[str] = []


def report(ok: bool, what: str, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(what)
    return ok


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} tokens, first difference at {i}"


def tiny_model():
    """A random tiny Llama (the tests' TINY_LLAMA) with fresh Medusa heads, and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from exporter.heads import fresh_heads

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_CONTEXT,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    heads = fresh_heads(4, config.hidden_size, config.vocab_size, lm_head=model.lm_head)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    return model, heads, tok


def decode_pair(backend, prompt, tree, max_new):
    from runtime.decode import DecodeConfig, decode

    medusa = decode(backend, prompt, DecodeConfig(max_new_tokens=max_new), tree)
    plain = decode(backend, prompt, DecodeConfig(max_new_tokens=max_new, medusa=False), tree)
    return medusa, plain


def prompts():
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "short prompt": (list(rng.integers(3, 128, 12)), 48),
        f"prompt longer than the prefill chunk ({3 * MAX_PROMPT - 5} tokens)": (
            list(rng.integers(3, 128, 3 * MAX_PROMPT - 5)),
            32,
        ),
        "to the end of the context": (list(rng.integers(3, 128, 20)), MAX_CONTEXT),
    }


# ---------------------------------------------------------------------------- stage 1: torch + CUDA


def stage_torch(model, heads) -> list[int]:
    import torch

    from exporter.torch_backend import TorchBackend
    from runtime.tree import load_tree

    class CudaTorchBackend(TorchBackend):
        """The PyTorch reference backend with the model on the GPU (cache still on the host)."""

        def _run_backbone(self, input_ids, position_ids, tree_mask, past):
            t = self._torch
            with t.inference_mode():
                args = [t.from_numpy(a).cuda() for a in (input_ids, position_ids, tree_mask, *past)]
                out = self.step(*args)
            logits, hidden, *presents = [o.float().cpu().numpy() for o in out]
            return logits, hidden, presents

        def _run_heads(self, hidden):
            with self._torch.inference_mode():
                return self.heads_step(self._torch.from_numpy(hidden).cuda()).float().cpu().numpy()

    model.cuda()
    heads.cuda()
    backend = CudaTorchBackend(model, heads)
    tree = load_tree(TREE, num_heads=4)
    prompt, max_new = prompts()["short prompt"]
    medusa, plain = decode_pair(backend, prompt, tree, max_new)
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    report(medusa.tokens == plain.tokens, f"torch CUDA ({torch.cuda.get_device_name()}): Medusa greedy == plain greedy",
           f"{len(medusa.tokens)} tokens, mean accepted {medusa.stats.mean_accepted:.2f}" if medusa.tokens == plain.tokens
           else first_difference(medusa.tokens, plain.tokens))  # fmt: skip
    report(
        plain.tokens == hf,
        "torch CUDA: plain greedy == HF generate",
        "" if plain.tokens == hf else first_difference(plain.tokens, hf),
    )
    model.cpu()
    heads.cpu()
    return plain.tokens


# ---------------------------------------------------------------------------- stage 2: TensorRT


def stage_tensorrt(model, heads, tok, workdir: Path, torch_tokens: list[int]) -> None:
    import tensorrt as trt

    from exporter.export import ExportOptions, export_artifact
    from exporter.trt_build import build_engines
    from exporter.trt_cli import POLYGRAPHY_SCRIPT, write_recipes
    from exporter.trt_plan import Limits, make_plan, resolve_tree
    from runtime.artifact import read_artifact
    from runtime.tree import load_tree
    from runtime.trt_backend import TensorRTBackend

    print(f"INFO TensorRT {trt.__version__}", flush=True)
    folder = workdir / "artifact"
    t0 = time.perf_counter()
    export_artifact(model, heads, folder, ExportOptions(dtype="float32", graph="portable", tree=TREE, force=True),
                    tokenizer=tok)  # fmt: skip
    report(True, "export (ONNX Runtime validated against PyTorch)", f"{time.perf_counter() - t0:.0f}s")
    cfg = read_artifact(folder)
    plan = make_plan(cfg, Limits(max_prompt=MAX_PROMPT, opt_prompt=16, opt_context=64))
    write_recipes(folder, plan, resolve_tree(cfg))

    t0 = time.perf_counter()
    build_engines(folder, plan, cfg, write=lambda s: print(f"  {s}", flush=True))
    report(True, "build-engine (Python API, 3 backbone profiles, timing cache)", f"{time.perf_counter() - t0:.0f}s")

    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    lines = [x for x in (folder / POLYGRAPHY_SCRIPT).read_text().splitlines() if x.startswith("polygraphy ")]
    for line in lines:
        profile = line.split(":load_")[-1].split()[0]
        if exe is None:
            report(False, f"polygraphy {profile}", "the polygraphy command is not installed")
            continue
        proc = subprocess.run(["bash", "-c", line.replace("polygraphy ", f"{exe} ", 1)], cwd=folder,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        tail = [x for x in (proc.stdout + proc.stderr).splitlines() if "PASSED" in x or "FAILED" in x or "Error" in x]
        report(
            proc.returncode == 0,
            f"polygraphy --onnxrt --trt, profile {profile}",
            (tail or ["(no summary line)"])[-1].strip(),
        )
        if proc.returncode:
            print((proc.stdout + proc.stderr)[-3000:], flush=True)

    backend = TensorRTBackend.from_artifact(folder, cfg)
    tree = load_tree(TREE, num_heads=4)
    for name, (prompt, max_new) in prompts().items():
        t0 = time.perf_counter()
        medusa, plain = decode_pair(backend, prompt, tree, max_new)
        same = medusa.tokens == plain.tokens
        detail = (f"{len(medusa.tokens)} tokens ({medusa.stats.finish_reason}), mean accepted "
                  f"{medusa.stats.mean_accepted:.2f}, {time.perf_counter() - t0:.1f}s") if same else first_difference(medusa.tokens, plain.tokens)  # fmt: skip
        report(same, f"TensorRT {name}: Medusa greedy == plain greedy", detail)
        if name == "short prompt":
            agree = next((k for k, (a, b) in enumerate(zip(plain.tokens, torch_tokens)) if a != b), len(torch_tokens))
            print(f"INFO TensorRT plain greedy agrees with torch CUDA for {agree}/{len(torch_tokens)} tokens "
                  "(float32 engine, TF32 off; a difference here is numerical, not a failure)", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="where to export and build (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"SKIP torch and transformers are needed for every stage ({e}); nothing was checked", flush=True)
        return 2
    if not torch.cuda.is_available():
        print(f"SKIP torch {torch.__version__} sees no CUDA device; nothing was checked", flush=True)
        return 2
    model, heads, tok = tiny_model()
    try:
        torch_tokens = stage_torch(model, heads)
    except Exception:  # a crash is a failed check: report it, keep the traceback visible
        traceback.print_exc()
        report(False, "torch CUDA stage", "crashed (traceback above)")
        torch_tokens = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("SKIP tensorrt is not installed: export, engine build, Polygraphy comparison and TensorRT decoding "
              "were not run (pip install tensorrt on a GPU machine)", flush=True)  # fmt: skip
        return 1 if failures else 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medusa-trt-device-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        stage_tensorrt(model, heads, tok, workdir, torch_tokens)
    except Exception:
        traceback.print_exc()
        report(False, "TensorRT stage", "crashed (traceback above)")
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'FAIL' if failures else 'PASS'} device check: {len(failures)} failure(s) {failures}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
