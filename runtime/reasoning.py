"""Reasoning text apart from the answer: the server's ``--reasoning-parser think``.

Thinking models (Qwen3, QwQ, DeepSeek-R1 and their distillations) write their reasoning between
``<think>`` and ``</think>`` before the answer. OpenAI-compatible servers return it apart:
vLLM's reasoning parsers put it in the message's (and each streamed delta's) ``reasoning`` field,
formerly ``reasoning_content``, and the answer alone in ``content``. :class:`ThinkSplit` does the
same for one answer, a piece at a time as a stream delivers it:

* the answer starts inside the reasoning where the prompt ends with ``<think>`` (templates that open
  the block themselves: DeepSeek-R1, Qwen3.5), or where the answer itself begins with ``<think>``
  (Qwen3, whose template leaves it to the model; the tag is dropped);
* a prompt that ends with ``</think>`` (Qwen3 with ``enable_thinking: false``: the template writes
  an empty block) and an answer that opens no block are content throughout;
* ``</think>`` ends the reasoning; the newlines after it are dropped, the rest is content; a block
  never closed (``max_tokens`` reached) leaves everything reasoning.

The reasoning is the text between the tags exactly, and the pieces of a stream join to what the
whole answer splits into: a tail that could begin a tag is held until the next piece tells.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("think",)


def partial_tail(text: str, tag: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``tag``: what a stream holds
    back while the next piece may complete ``tag`` (a tag here, a stop string in the server)."""
    return max((k for k in range(1, min(len(tag), len(text) + 1)) if text.endswith(tag[:k])), default=0)


class ThinkSplit:
    """One answer's text split into (reasoning, content) as it arrives (see the module doc)."""

    def __init__(self, prompt_text: str = ""):
        tail = prompt_text.rstrip()
        if tail.endswith(CLOSE):
            self.state = "content"
        elif tail.endswith(OPEN):
            self.state = "reasoning"
        else:
            self.state = "start"  # the answer may open a block: its first characters tell
        self._held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the content that ``text`` (the answer's next piece) releases; ``final``:
        the answer ends here, nothing is held."""
        buf, self._held = self._held + text, ""
        reasoning, content = [], []
        while buf:
            if self.state == "start":
                lead = buf.lstrip()
                if lead.startswith(OPEN):
                    self.state, buf = "reasoning", lead[len(OPEN) :]
                elif lead and not OPEN.startswith(lead) or final:
                    self.state = "content"
                else:  # blank so far, or the beginning of the tag: wait for more
                    self._held = buf
                    break
            elif self.state == "reasoning":
                at = buf.find(CLOSE)
                if at >= 0:
                    reasoning.append(buf[:at])
                    self.state, buf = "lead", buf[at + len(CLOSE) :]
                else:
                    keep = 0 if final else partial_tail(buf, CLOSE)
                    reasoning.append(buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    break
            elif self.state == "lead":  # the newlines between the block and the answer
                buf = buf.lstrip("\n")
                if buf:
                    self.state = "content"
            else:
                content.append(buf)
                break
        return "".join(reasoning), "".join(content)
