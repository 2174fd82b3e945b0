"""The SmolLM2 protocol of bench/plan_quality.py: which pydoc windows calibrate, which score, which are held out.

Windows of 512 tokens of ``prunescope.data.pydoc_text()`` (220 in all, 110 per half):
- calibration: windows 0..31 (first half), the input statistics of Wanda and SparseGPT, as in
  bench/oneshot_llm.py;
- profile: windows 32..33 (first half), the evaluator of the sensitivity scans (KL to dense);
- fitness: windows 32..39 (first half), the search's fitness (screening on the first, survivors on all);
- held-out: windows 110..125 (the start of the second half), perplexity; never seen by a plan.
"""

from __future__ import annotations

SEQ_LEN = 512
CALIBRATION = (0, 32)
PROFILE = (32, 2)
FITNESS = (32, 8)
HELD_OUT = (110, 16)


def windows(loaded, span: tuple[int, int]):
    """The (first, count) windows of the pydoc text, tokenized by ``loaded``'s tokenizer."""
    from prunescope.data import pydoc_text, token_ids, windows_of

    first, count = span
    return windows_of(token_ids(pydoc_text(), loaded.tokenizer), SEQ_LEN, count, first)
