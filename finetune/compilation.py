"""torch.compile in training that never runs eager without saying so.

`compile_layers` compiles each decoder layer of the language model and `torch_compile` the whole model.
Either can come to nothing without a word: when dynamo meets code it cannot trace (a graph break) in a
frame, that frame runs eager, and a training stage that relied on compilation for its speed and memory
runs at eager speed. `CompileWatch` counts the graphs dynamo built from the moment the model was
compiled to the end of the first optimizer step this process trains. None means the model ran eager:
with the option `true` that stops the stage with a one-line error that gives dynamo's reason and how to
turn the option off; with `auto` the stage goes on eager with a one-line warning, and both land in
`stage_complete.json` under `compilation`. Graph breaks where some graphs were built are reported the
same way, as a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


class CompileError(ValueError):
    """A stage asked for compilation (`true`) and dynamo compiled nothing."""


def decoder_layers(model):
    """The decoder layers of the language model of `model` (a PEFT wrapper or the bare model), where its
    family (medllava.families) keeps them."""
    from operator import attrgetter

    from medllava.families import model_family

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return attrgetter(model_family(base).decoder_layers)(base)


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer of the language model in place (`nn.Module.compile`, dynamic shapes);
    returns how many. The layers share their code, so one compilation serves all of them."""
    allow_checkpointed_side_effects()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def allow_checkpointed_side_effects() -> None:
    """Let dynamo compile activation checkpointing whose forward sets Python state.

    From transformers 5.25 a decoder layer checkpoints inside its own `forward`, so a compiled layer traces
    `torch.utils.checkpoint` too, and the attention's kernel-hub wrapper (the `kernels` package) sets and
    resets a context variable in there. Dynamo refuses such a side effect inside a checkpoint unless told it
    need not be replayed when the backward pass recomputes the forward: with it refused, the whole layer
    ran eager. The wrapper resets what it set before returning, so there is nothing to replay. Torch
    releases without the setting have no such refusal."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


@dataclass
class CompileReport:
    """What compilation did over the first step: kept in stage_complete.json."""

    option: str
    setting: bool | str
    graphs: int = 0
    graph_breaks: int = 0
    first_break: str | None = None
    compiled: bool | None = None
    step: int | None = None
    message: str | None = None


@dataclass
class CompileWatch:
    """Checks, after the first optimizer step this process trains, that compilation really happened.

    Create it when the model is compiled (compiling in a memory probe counts: training then reuses those
    graphs); `check(step)` after the first step raises `CompileError` or records the fallback.
    """

    stage: str
    option: str
    setting: bool | str
    report: CompileReport = field(init=False)
    _graphs_before: int = field(init=False, default=0)
    _breaks_before: Counter = field(init=False, default_factory=Counter)

    def __post_init__(self):
        import torch._dynamo
        from torch._dynamo.utils import counters

        # Graphs cached for an earlier model of this process (another stage, another run) would be reused
        # without being counted: start from nothing, so every graph counted belongs to this stage.
        torch._dynamo.reset()
        self.report = CompileReport(self.option, self.setting)
        self._graphs_before = counters["stats"]["unique_graphs"]
        self._breaks_before = Counter(counters["graph_break"])

    def check(self, step: int) -> CompileReport:
        """Count what dynamo did since the watch began; raise or record as the setting says."""
        from torch._dynamo.utils import counters

        if self.report.compiled is not None:
            return self.report
        breaks = Counter(counters["graph_break"]) - self._breaks_before
        report = self.report
        report.step = step
        report.graphs = counters["stats"]["unique_graphs"] - self._graphs_before
        report.graph_breaks = sum(breaks.values())
        report.first_break = _reason(next(iter(breaks))) if breaks else None
        report.compiled = report.graphs > 0
        what = "the decoder layers" if self.option == "compile_layers" else "the model"
        if not report.compiled:
            why = report.first_break or _no_graph_reason()
            report.message = (f"{self.option} is on but {what} ran eager in step {step}: dynamo compiled no graph"
                              f" ({why})")
            if self.setting is True:
                raise CompileError(f"stage {self.stage}: {report.message}; set {self.stage}.{self.option}=false to"
                                   " train uncompiled, or auto to go on eager with a warning")
            report.message += "; going on uncompiled (auto)"
        elif report.graph_breaks:
            report.message = (f"{self.option}: {what} compiled into {report.graphs} graphs with {report.graph_breaks}"
                              f" graph breaks, which run eager in between (first: {report.first_break})")
        return report

    def as_dict(self) -> dict:
        return asdict(self.report)


def watch_compilation(stage_name: str, stage) -> CompileWatch | None:
    """A watch for the stage's compile option (`compile_layers` or `torch_compile`), or None when off."""
    for option in ("compile_layers", "torch_compile"):
        setting = getattr(stage, option)
        if setting:
            return CompileWatch(stage_name, option, setting)
    return None


def _reason(graph_break: str) -> str:
    """The first lines of a dynamo graph-break reason, on one line."""
    lines = [line.strip() for line in graph_break.splitlines() if line.strip()]
    keep = [line for line in lines[:4] if not line.startswith(("Hint:", "Developer debug context"))]
    text = " ".join(keep[:3])
    return text if len(text) <= 300 else text[:297] + "..."


def _no_graph_reason() -> str:
    import os

    import torch._dynamo

    if os.environ.get("TORCHDYNAMO_DISABLE") == "1" or torch._dynamo.config.disable:
        return "dynamo is disabled in this process (TORCHDYNAMO_DISABLE=1)"
    return ("dynamo gave no reason: it skipped the code, as it does for code under torch.compiler.disable"
            " or on its skip lists")
