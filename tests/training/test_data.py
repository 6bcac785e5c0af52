"""training/data.py: the heads' and the backbone's targets (only assistant tokens count)."""

from __future__ import annotations

import numpy as np


def test_head_label_offset_only_assistant_tokens():
    from training.data import IGNORE, head_labels, next_token_labels

    tokens = np.arange(10, 20)
    assistant = np.arange(10) >= 5  # prompt 0..4, response 5..9
    lab = head_labels(tokens, assistant, np.arange(10), num_heads=3)
    for t in range(10):
        for k in range(3):
            target = t + k + 2  # head k at t predicts t+k+2 (the backbone predicts t+1)
            want = tokens[target] if 5 <= target < 10 else IGNORE
            assert lab[t, k] == want, (t, k)
    assert lab[3, 0] == 15 and lab[2, 0] == IGNORE and lab[2, 1] == 15 and lab[7, 0] == 19 and lab[8, 0] == IGNORE
    nt = next_token_labels(tokens, assistant)
    assert nt[4] == 15 and nt[3] == IGNORE and nt[9] == IGNORE
