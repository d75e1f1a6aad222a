"""Which parts of ONNX Runtime's serving form pay on this machine, measured here rather than assumed.

The serving form's rules (Winograd for 3x3 convolutions with 128 or more input
channels, query chunks where MultiHeadAttention's CPU kernel would tile thin
blocks for the L2 read from this machine) were measured on two hosts. A CPU
with another cache, another vector width or AMX may disagree: on a 4 MiB-L2
AMX Xeon the whole form ran 4 % slower than the file as written at 32 px while
it was 20-37 % faster at 64-128 px. So the form can be tuned where it will
serve: each candidate (the file as written, attention rewritten, convolutions
as Winograd, both) is built, run at the shapes the user serves, and the
fastest kept, as TensorRT times its tactics. A form is kept only when it is
faster than the file by ``margin`` over those shapes (geometric mean of the
time ratios) and slower at none of them, so where no rewrite pays, none is
made, and the form kept never loses to the file at a shape it was measured at.

Timing is interleaved against drift on a shared machine, and sessions are
sampled, not calls alone: every candidate gets a fresh session in each of
``passes`` passes (in order, then reversed, alternately), and its time at a
shape is the median over passes of each session's median call. On this
project's 2-core VM one graph's sessions differed by up to 40 % (70 against
97 ms for the same Winograd form at 32 px, each session steady within
itself), so a single session per candidate decided by chance.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UsageError
from ..host import cpu_info
from ..shapes import Shape
from ..spec import format_shape
from ..spec import ModelSpec
from .ort_runner import OrtRunner

AS_WRITTEN = "as written"
# A rewrite must beat the file by this much (geometric mean over the shapes) to be kept: below it the difference is
# within what two passes on a shared machine can tell apart.
DEFAULT_MARGIN = 0.03
DEFAULT_CALLS = 4
DEFAULT_PASSES = 3


@dataclass
class Candidate:
    """One form of the file: how OrtRunner builds it, what it rewrote and its median latency per shape."""

    name: str
    attention: str             # "as-is" (the file), or the serving form's attention (auto, ..., none)
    winograd: bool
    parts: list[str] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)
    times: dict[str, list[list[float]]] = field(default_factory=dict)  # shape -> per session, its calls

    @property
    def runner_attention(self) -> str:
        """The same, in OrtRunner's words (its "onnxruntime" is the serving form's "auto")."""
        return "onnxruntime" if self.attention == "auto" else self.attention

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parts": self.parts, "median_ms": {k: round(v, 3) for k, v in self.ms.items()}}


@dataclass
class Tuning:
    """The candidates measured, the one kept, and where and how they were measured."""

    candidates: list[Candidate]
    chosen: Candidate
    shapes: list[Shape]
    threads: int | None
    provider: str
    margin: float
    passes: int = DEFAULT_PASSES
    host: dict[str, Any] = field(default_factory=cpu_info)

    @property
    def file(self) -> Candidate:
        return self.candidates[0]

    def ratio(self, c: Candidate) -> float:
        """Geometric mean over the shapes of this candidate's median time over the file's."""
        keys = list(self.file.ms)
        return math.exp(sum(math.log(c.ms[k] / self.file.ms[k]) for k in keys) / len(keys))

    @property
    def pays(self) -> bool:
        """Whether any rewrite was kept."""
        return self.chosen is not self.file

    def losses(self) -> list[str]:
        """Shapes where the kept form is slower than the file (none: the rule keeps no such form)."""
        return [k for k in self.file.ms if self.chosen.ms[k] > self.file.ms[k]]

    def summary(self) -> str:
        """One line: every candidate's ratio to the file and the one kept."""
        rows = ", ".join(f"{c.name} {self.ratio(c):.2f}x" for c in self.candidates[1:])
        return f"against the file as written at {', '.join(self.file.ms)}: {rows}; kept: {self.chosen.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": [format_shape(s) for s in self.shapes], "threads": self.threads, "provider": self.provider,
                "margin": self.margin, "sessions_per_candidate": self.passes, "chosen": self.chosen.name, "parts": self.chosen.parts,
                "candidates": [{**c.to_dict(), "ratio_to_file": round(self.ratio(c), 4)} for c in self.candidates],
                "losses": self.losses(), "host": self.host}


def _candidates(serving_attention: str) -> list[Candidate]:
    return [Candidate(AS_WRITTEN, "as-is", False), Candidate("attention", serving_attention, False),
            Candidate("winograd", "none", True), Candidate("attention + winograd", serving_attention, True)]


def _time(runner: OrtRunner, feeds: dict[str, Any], calls: int) -> list[float]:
    for _ in range(2):  # the first call at a shape allocates and plans
        runner.infer(feeds)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.infer(feeds)
        out.append(time.perf_counter() - t0)
    return out


def tune_serving_form(path: str | Path, spec: ModelSpec, shapes: Sequence[Shape], *,
                      provider: str = "CPUExecutionProvider", threads: int | None = None,
                      serving_attention: str = "auto", calls: int = DEFAULT_CALLS, passes: int = DEFAULT_PASSES,
                      margin: float = DEFAULT_MARGIN,
                      progress: Callable[[str], None] | None = None, graph_optimization: str = "all") -> Tuning:
    """Measure the file and each form of its rewrites at ``shapes`` on ``provider``; keep the fastest that pays.

    A candidate that rewrites nothing more than another (no eligible convolution, no attention site) is left out.
    """
    if not shapes:
        raise UsageError("tuning needs at least one shape to measure")
    if calls < 1 or passes < 1:
        raise UsageError(f"tuning needs at least one pass and one timed call per shape (got {passes} and {calls})")
    say = progress or (lambda _text: None)
    feeds = {format_shape(s): spec.make_inputs(*s, seed=0) for s in shapes}
    kept: list[Candidate] = []
    seen: set[tuple[str, ...]] = set()
    for pass_ in range(max(passes, 1)):
        order = _candidates(serving_attention) if pass_ == 0 else kept[::-1] if pass_ % 2 else kept
        for c in order:
            runner = OrtRunner(path, providers=[provider], threads=threads, spec=spec, attention=c.runner_attention,
                               winograd=c.winograd, graph_optimization=graph_optimization)
            say(f"tune: {c.name} (pass {pass_ + 1} of {passes})")
            with runner:
                if pass_ == 0:
                    c.parts = runner.serving_form_parts()
                    key = tuple(c.parts)
                    if key in seen:
                        continue  # the same graph as a candidate already measured
                    seen.add(key)
                    kept.append(c)
                for name, f in feeds.items():
                    c.times.setdefault(name, []).append(_time(runner, f, calls))
    for c in kept:
        c.ms = {k: 1e3 * statistics.median(statistics.median(s) for s in v) for k, v in c.times.items()}
    tuning = Tuning(kept, kept[0], list(shapes), threads, provider, margin, passes)
    tuning.chosen = _keep(tuning)
    return tuning


def _keep(tuning: Tuning) -> Candidate:
    """The form to keep: the fastest (geometric mean of its ratios to the file) of those faster than the file by the
    margin over the shapes and slower at none of them (one form serves every shape); else the file."""
    file = tuning.file
    eligible = [c for c in tuning.candidates[1:]
                if tuning.ratio(c) <= 1 - tuning.margin and all(c.ms[k] <= file.ms[k] for k in file.ms)]
    return min(eligible, key=tuning.ratio) if eligible else file
