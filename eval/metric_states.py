"""The evaluation's metric networks and metric states.

Every state is a torchmetrics ``Metric``, so ``compute()`` gathers it over processes: counts
with ``dist_reduce_fx="sum"``, per-video values and FVD features with ``"cat"``.
``MetricNetworks`` carries the networks behind FVD, LPIPS and CLIP score (loaded by the
caller; tests inject tiny random ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import CatMetric, Metric

from eval.oracle import judge
from eval.oracle_stats import JOINT_BY_PROMPT, pair_verdicts, verdict_string, wilson_interval
from eval.report import is_ok
from eval.shapes_world import COLOURS, LANGS, MOTIONS, SHAPES, caption_lang, parse_caption


@dataclass
class MetricNetworks:
    """The networks behind FVD, LPIPS and CLIP score, or why each is unavailable.

    fvd_model maps float [B, 3, T, 224, 224] in [-1, 1] to features [B, D] (the I3D);
    ``*_network`` names what was loaded ("random-test" for the tests' random networks, which
    the report never prints under the metric's name).
    """

    fvd_model: Callable[[torch.Tensor], torch.Tensor] | None = None
    fvd_network: str = "i3d-kinetics400-tfhub"
    fvd_reason: str = ""
    lpips_model: nn.Module | None = None
    lpips_network: str = ""
    lpips_reason: str = ""
    clip_metric: Metric | None = None
    clip_network: str = ""
    clip_reason: str = ""

    def to(self, device: torch.device) -> MetricNetworks:
        for name in ("fvd_model", "lpips_model", "clip_metric"):
            module = getattr(self, name)
            if isinstance(module, nn.Module):
                setattr(self, name, module.to(device))
        return self


class VideoFeatures(Metric):
    """Per-video feature vectors [N, dim], gathered over processes (for FVD and its bootstrap).

    Stored flattened (1-D) because torchmetrics pads a process without samples with a 1-D
    empty tensor before gathering; 1-D states of any length then gather alike.
    """

    full_state_update = False

    def __init__(self, dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(features.shape)}")
        if self.dim is None:
            self.dim = int(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"features have D={features.shape[1]}, expected {self.dim}")
        self.values.append(features.detach().to(self.dtype).reshape(-1))

    def compute(self) -> torch.Tensor:
        """float [N, dim] on the CPU (N = 0 when nothing was seen anywhere)."""
        values = self.values
        if isinstance(values, list):
            values = torch.cat(values) if values else torch.zeros(0)
        dim = self.dim or 1
        return values.detach().cpu().reshape(-1, dim)


ORACLE_FIELDS = ("n", "colour", "shape", "motion", "joint", "not_found", "no_motion")
# The values of each factor, in the order of the confusion tables' rows and columns.
FACTOR_VALUES = {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS}
NOT_RECOVERED = "none"  # the confusion column of videos whose factor the oracle could not read


class OracleCounts(Metric):
    """Oracle tallies, summed over processes: per caption language counts [len(LANGS), 7] (see
    ORACLE_FIELDS), equal to ``eval.oracle.accuracy`` on the same videos, and per factor a
    confusion table [values, values + 1] (captioned value x recovered value, last column: not
    recovered). The tables show what an aggregate hides, e.g. a system that draws every shape
    as a circle scores 33% shape accuracy with every square and triangle in the circle column.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(len(LANGS), len(ORACLE_FIELDS),
                                                     dtype=torch.int64), dist_reduce_fx="sum")
        for factor, values in FACTOR_VALUES.items():
            self.add_state(f"confusion_{factor}", dist_reduce_fx="sum",
                           default=torch.zeros(len(values), len(values) + 1, dtype=torch.int64))
        # Each prompt's joint verdict, so that two systems pair up prompt by prompt.
        self.add_state("prompt_index", default=[], dist_reduce_fx="cat")
        self.add_state("prompt_joint", default=[], dist_reduce_fx="cat")

    def update(self, videos: torch.Tensor, prompts: Sequence[str],
               indices: Sequence[int] | None = None) -> None:
        """videos uint8 [B, T, H, W, 3]; prompts: shapes-world captions (either language);
        indices: the prompts' positions in the evaluation's list (for the paired comparison)."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        if indices is not None and len(indices) != len(prompts):
            raise ValueError(f"{len(indices)} indices but {len(prompts)} prompts")
        targets = [parse_caption(p) for p in prompts]  # all checked before anything is counted
        joint = []
        for video, prompt, target in zip(videos.cpu().numpy(), prompts, targets):
            verdict = judge(video)
            hits = verdict.matches(target)
            joint.append(bool(hits["joint"]))
            row = [1, hits["colour"], hits["shape"], hits["motion"], hits["joint"],
                   not verdict.found, verdict.found and verdict.motion is None]
            self.counts[LANGS.index(caption_lang(prompt))] += torch.tensor(
                [int(v) for v in row], device=self.counts.device)
            for factor, values in FACTOR_VALUES.items():
                recovered = getattr(verdict, factor)
                column = values.index(recovered) if recovered is not None else len(values)
                table = getattr(self, f"confusion_{factor}")
                table[values.index(getattr(target, factor)), column] += 1
        if indices is not None:
            self.prompt_index.append(torch.as_tensor(list(indices), dtype=torch.int64,
                                                     device=self.counts.device))
            self.prompt_joint.append(torch.tensor(joint, dtype=torch.bool,
                                                  device=self.counts.device))

    def compute(self) -> dict:
        counts = self.counts.cpu()

        def summary(row: torch.Tensor) -> dict:
            values = dict(zip(ORACLE_FIELDS, (int(v) for v in row)))
            n = values["n"]
            result = {"n": n}
            for key in ("colour", "shape", "motion", "joint"):
                result[key] = values[key] / n if n else float("nan")
            result["correct"] = {k: values[k] for k in ("colour", "shape", "motion", "joint")}
            result.update(not_found=values["not_found"], no_motion=values["no_motion"])
            return result

        result = summary(counts.sum(dim=0))
        if result["n"]:
            result["joint_ci95"] = list(wilson_interval(result["correct"]["joint"], result["n"]))
        result["by_language"] = {lang: summary(counts[i]) for i, lang in enumerate(LANGS)}
        result["by_value"], result["confusion"] = {}, {}
        for factor, values in FACTOR_VALUES.items():
            table = getattr(self, f"confusion_{factor}").cpu()
            columns = (*values, NOT_RECOVERED)
            # Accuracy among the prompts that ask for each value (values never asked for: absent).
            result["by_value"][factor] = {
                value: int(table[i, i]) / int(table[i].sum())
                for i, value in enumerate(values) if table[i].sum() > 0}
            result["confusion"][factor] = {
                value: {columns[j]: int(c) for j, c in enumerate(table[i].tolist()) if c}
                for i, value in enumerate(values) if table[i].sum() > 0}
        result[JOINT_BY_PROMPT] = self._joint_by_prompt()
        return result

    def _joint_by_prompt(self) -> dict[int, bool]:
        """{prompt index: joint verdict}. A prompt seen twice keeps its first verdict (it is
        the same video); Lightning's predict sampler does not repeat prompts, a padding
        DistributedSampler would."""
        index, joint = self.prompt_index, self.prompt_joint
        if isinstance(index, list):  # not synced: this process's batches, or none at all
            if not index:
                return {}
            index, joint = torch.cat(index), torch.cat(joint)
        verdicts: dict[int, bool] = {}
        for i, ok in zip(index.cpu().tolist(), joint.cpu().tolist()):
            verdicts.setdefault(int(i), bool(ok))
        return verdicts


def add_oracle_comparisons(results: list[dict], verdicts: dict[str, dict[int, bool]]) -> None:
    """Each student's oracle slot gains ``versus``: per teacher system, the exact McNemar
    comparison on the prompts both were judged on (``eval.oracle_stats.paired_comparison``)."""
    teachers = [r["name"] for r in results if r.get("kind") == "teacher" and r["name"] in verdicts]
    for entry in results:
        name = entry["name"]
        if entry.get("kind") != "student" or name not in verdicts or not is_ok(entry.get("oracle")):
            continue
        pairs = {teacher: pair_verdicts(verdicts[name], verdicts[teacher]) for teacher in teachers}
        entry["oracle"]["versus"] = {t: c for t, c in pairs.items() if c is not None}


def keep_verdicts(results: list[dict], verdicts: dict[str, dict[int, bool]], n: int) -> None:
    """Each oracle slot keeps its per-prompt verdicts as a string (``verdict_string``), so that
    another run's report can be paired with this one (``eval.compare``)."""
    for entry in results:
        if entry["name"] in verdicts and is_ok(entry.get("oracle")):
            entry["oracle"][JOINT_BY_PROMPT] = verdict_string(verdicts[entry["name"]], n)


def cat_values(metric: CatMetric) -> torch.Tensor:
    values = metric.compute()
    if isinstance(values, list):  # torchmetrics returns [] when no value was seen anywhere
        return torch.zeros(0)
    return values.detach().cpu().reshape(-1).double()


def mean_std(values: torch.Tensor) -> dict:
    """{"mean", "std" (with N - 1; 0 for one value), "n"} of a 1-D tensor (inf propagates)."""
    n = int(values.numel())
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = float(values.mean())
    std = float(values.std(unbiased=True)) if n > 1 and math.isfinite(mean) else 0.0
    return {"mean": mean, "std": std, "n": n}
