"""Scoring protocols of the other medical-VQA harnesses, one registry: `PROTOCOLS`.

Each entry (`medllava.eval.protocols.base.Protocol`) names its harness, the file and commit it matches,
the published tables its numbers are comparable to, its closed-question rule and its known defects,
and holds a pure `score(examples, predictions, task, fixes)`. `score_protocols` runs every protocol
that has the task, as the harness computes it and, where it has computable defects, corrected, with
each defect's number both ways. A new protocol is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Sequence

from medllava.eval.protocols import huatuogpt_vision, lmms_eval, medevalkit, multimedeval
from medllava.eval.protocols.base import Defect, Protocol, metric_value
from medllava.eval.tasks.base import Example

BY_GOLD = "closed = the gold answer is yes or no"
BY_TYPE = "closed = the dataset's answer type"

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("medevalkit", "MedEvalKit", "alibaba-damo-academy/MedEvalKit", "9b12e3b34232a8779cc1275417bf4f72f03d28e0",
             "utils/{VQA_RAD,SLAKE,PATH_VQA}/*.py, utils/utils.py",
             BY_GOLD + " (VQA-RAD, PathVQA); " + BY_TYPE + " (SLAKE)",
             "Lingshu technical report and MedEvalKit tables, rule-based scoring (LLM judge off)",
             ("vqa-rad", "slake", "pathvqa"), medevalkit.DEFECTS, medevalkit.score),
    Protocol("multimedeval", "MultiMedEval", "corentin-ryr/MultiMedEval", "d9ac283f5ad989d4f78b709f7076f432de4aa69e",
             "multimedeval/task_families.py (VQA.evaluate), multimedeval/utils.py (clean_str)", BY_GOLD,
             "MultiMedEval's VQA-Rad, VQA-Path and SLAKE (English) closed/open accuracies and recall",
             ("vqa-rad", "slake", "pathvqa"), multimedeval.DEFECTS, multimedeval.score),
    Protocol("huatuogpt-vision", "HuatuoGPT-Vision", "FreedomIntelligence/HuatuoGPT-Vision",
             "f699d88d4d1eeb9f3e62fdb2da4e297bdacb67f0", "scorer.py (score_mix_llava, match_choice3)",
             BY_GOLD + "; open questions are not scored",
             "HuatuoGPT-Vision paper and README VQA-RAD/SLAKE/PathVQA columns (closed questions asked with "
             "lettered options)", ("vqa-rad", "slake", "pathvqa"), huatuogpt_vision.DEFECTS, huatuogpt_vision.score),
    Protocol("lmms-eval", "lmms-eval", "EvolvingLMMs-Lab/lmms-eval", "75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3",
             "lmms_eval/tasks/slake/utils.py", BY_TYPE,
             "lmms-eval slake_en / slake_zh results (it has no VQA-RAD or PathVQA task)", ("slake",), (),
             lmms_eval.score),
)}


def _defect_row(protocol: Protocol, defect: Defect, examples: Sequence[Example], predictions: Sequence[str],
                task: str, harness: dict) -> dict:
    """A defect with the number it moves, as the harness gives it and with only that defect fixed."""
    row = {"name": defect.name, "description": defect.description, "metric": defect.metric,
           "harness": metric_value(harness, defect.metric), "corrected": None}
    if defect.computable:
        fixed = protocol.score(examples, predictions, task, frozenset({defect.name}))
        row["corrected"] = metric_value(fixed, defect.metric)
    return row


def score_protocol(protocol: Protocol, examples: Sequence[Example], predictions: Sequence[str], task: str) -> dict:
    """One protocol's metrics.json entry: its facts, the harness numbers, the corrected ones and its defects."""
    entry = {"harness": protocol.harness, "repository": protocol.repository, "commit": protocol.commit,
             "file": protocol.file, "closed_rule": protocol.closed_rule, "comparable_to": protocol.comparable_to}
    if task not in protocol.tasks:
        return entry | {"applies": False, "reason": f"{protocol.harness} has no {task} task"}
    harness = protocol.score(examples, predictions, task, frozenset())
    defects = [d for d in protocol.defects if task in d.tasks]
    fixes = frozenset(d.name for d in defects if d.computable)
    corrected = protocol.score(examples, predictions, task, fixes) if fixes else None
    return entry | {"applies": True, "scores": harness, "corrected": corrected,
                    "defects": [_defect_row(protocol, d, examples, predictions, task, harness) for d in defects]}


def score_protocols(examples: Sequence[Example], predictions: Sequence[str], task: str | None) -> dict:
    """metrics.json's "protocols": {protocol name: score_protocol entry} for every registered protocol."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    return {name: score_protocol(p, examples, predictions, task or "") for name, p in PROTOCOLS.items()}
