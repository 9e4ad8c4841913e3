"""The expert (MoE routing) choice is identical on every rank at every step.

Under FSDP every rank's forward issues collectives over the shard group; ranks running different
experts would silently pair up mismatched all-gathers (reference lightning-and-style.md A5). The
2-process worker records, per rank, the expert chosen at each step of each fit (stage A, stage B
uninterrupted, interrupted and resumed) and the first value of the rank's batch.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed_worker import launch_two_process_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def choices():
    out = launch_two_process_run(steps=4)["out"]
    return [json.loads((out / f"choices_rank{r}.json").read_text()) for r in (0, 1)]


def test_same_expert_on_every_rank_at_every_step(choices):
    rank0, rank1 = choices
    assert len(rank0) == len(rank1) == 1 + 4 + 2 + 2
    for a, b in zip(rank0, rank1):
        assert (a["fit"], a["step"]) == (b["fit"], b["step"])
        assert a["expert"] == b["expert"], f"{a['fit']} step {a['step']}: {a['expert']} vs {b['expert']}"


def test_ranks_see_different_data(choices):
    # The agreement above is not trivial: the ranks train on different batches.
    rank0, rank1 = choices
    assert any(a["first_latent"] != b["first_latent"] for a, b in zip(rank0, rank1))


def test_resume_repeats_the_expert_sequence(choices):
    for rank in choices:
        full = [(c["step"], c["expert"]) for c in rank if c["fit"] == "full"]
        split = [(c["step"], c["expert"]) for c in rank if c["fit"] in ("first_half", "resumed")]
        assert split == full
        assert {e for _, e in full} == {"high", "low"}  # both experts were exercised


def test_resume_repeats_the_batches(choices):
    # Interrupted mid-epoch: the resumed run continues that epoch's batches, it does not start
    # the epoch over (distill.data.resumable).
    for rank in choices:
        full = [(c["step"], c["first_latent"]) for c in rank if c["fit"] == "full"]
        split = [(c["step"], c["first_latent"]) for c in rank
                 if c["fit"] in ("first_half", "resumed")]
        assert split == full
