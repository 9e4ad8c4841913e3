"""How sure an oracle accuracy is, and whether one system beats another on the same prompts.

Every system of an evaluation renders the same prompts from the same noise seeds, so two systems'
oracle verdicts pair up prompt by prompt. On 200 prompts an accuracy near 92% carries a 95%
interval about 7 points wide, so "A scores 92.0%, B 97.5%" alone does not say which is better;
the paired test below does, from the prompts where exactly one of the two is right.

- ``wilson_interval``: the Wilson score interval of one accuracy (good coverage near 0 and 1,
  where the normal approximation's interval leaves [0, 1]).
- ``paired_comparison``: the exact McNemar test. Under "equally good", the prompts only A gets
  right and those only B gets right are a fair coin's heads and tails, so the two-sided p-value
  is a binomial tail over the discordant prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

# The oracle slot's key for the per-prompt verdicts (``verdict_string``) in report.json.
JOINT_BY_PROMPT = "joint_by_prompt"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` at ``confidence``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie strictly between 0 and 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 or 1 one end is p itself, which rounding may push a hair past it.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2.0 ** discordant
    return min(1.0, 2.0 * tail)


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """A against B on the same prompts: {"n", "only_a", "only_b", "difference" (accuracy of A
    minus B), "p_value" (exact McNemar, two-sided)}."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"need one verdict per prompt for both systems, got {len(correct_a)} and "
                         f"{len(correct_b)}")
    only_a = sum(bool(a) and not bool(b) for a, b in zip(correct_a, correct_b))
    only_b = sum(bool(b) and not bool(a) for a, b in zip(correct_a, correct_b))
    n = len(correct_a)
    return {"n": n, "only_a": only_a, "only_b": only_b, "difference": (only_a - only_b) / n,
            "p_value": mcnemar_exact_p(only_a, only_b)}


def pair_verdicts(a: dict[int, bool], b: dict[int, bool]) -> dict | None:
    """``paired_comparison`` of two {prompt index: verdict} maps on the prompts both judged;
    None when they share none."""
    shared = sorted(a.keys() & b.keys())
    return paired_comparison([a[i] for i in shared], [b[i] for i in shared]) if shared else None


def verdict_string(verdicts: dict[int, bool], n: int) -> str:
    """Per-prompt verdicts as one character per prompt index 0..n-1: "1" right, "0" wrong, "-"
    not judged. Kept in report.json so that two reports pair up prompt by prompt."""
    if any(not 0 <= i < n for i in verdicts):
        raise ValueError(f"prompt indices {sorted(verdicts)} must lie in [0, {n})")
    return "".join("-" if i not in verdicts else "1" if verdicts[i] else "0" for i in range(n))


def parse_verdict_string(text: str) -> dict[int, bool]:
    """``verdict_string``'s inverse: {prompt index: verdict} of the judged prompts."""
    if not isinstance(text, str) or set(text) - {"0", "1", "-"}:
        raise ValueError(f"a verdict string holds only 0, 1 and -, got {text!r:.60}")
    return {i: c == "1" for i, c in enumerate(text) if c != "-"}
