"""README and docs: every relative link names a file that exists, and every ``#anchor`` a heading
that exists there (GitHub's heading ids), so moving a section cannot leave a dead link."""

import functools
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the guides and the two records that link into them; the per-session result files are raw outputs
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "docs/results/README.md",
        ROOT / "docs/results/HISTORY.md", ROOT / "tests/README.md"]  # fmt: skip
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _lines_outside_code(text: str):
    inside = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            yield line


def slug(heading: str) -> str:
    """GitHub's id for a heading: markup and punctuation dropped, lowercase, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@functools.cache  # a file's headings, read once however many links point into it
def anchors(path: Path) -> frozenset[str]:
    seen: Counter[str] = Counter()
    out = set()
    for line in _lines_outside_code(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if not seen[s] else f"{s}-{seen[s]}")
            seen[s] += 1
    return frozenset(out)


def links(path: Path):
    for line in _lines_outside_code(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for m in LINK.finditer(line):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # not http:, mailto: ...
                yield target


def test_the_slug_rule():
    assert slug("Serving (`medusa-run serve`): an OpenAI-compatible HTTP server") == (
        "serving-medusa-run-serve-an-openai-compatible-http-server"
    )
    assert slug("The lm_head screen: greedy steps without the float lm_head") == (
        "the-lm_head-screen-greedy-steps-without-the-float-lm_head"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc):
    dead = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            dead.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target}: no heading with that id in {dest.relative_to(ROOT)}")
    assert dead == []
