"""Partial-rollout generation: engines (simulated and a small real torch model), the scheduler, metrics.

``Scheduler`` drives one step of a :class:`~pr_loader.linked.LinkedDataProto` through an ``Engine``:
prefetch, generate, stop when the policy says so, postpone the unfinished rows with their partial output.
"""

from pr_loader.rollout.engine import Engine, GenOutput, GenRequest, SlotSpan
from pr_loader.rollout.metrics import RunMetrics, StepMetrics
from pr_loader.rollout.scheduler import (
    FIELD_PARTIAL_LOGPROBS,
    FIELD_PARTIAL_TOKENS,
    FIELD_PARTIAL_VERSIONS,
    Scheduler,
    StepResult,
)
from pr_loader.rollout.simulated import LengthDistribution, SimulatedEngine
from pr_loader.rollout.torch_engine import TinyConfig, TinyTransformer, TorchEngine

__all__ = [
    "FIELD_PARTIAL_LOGPROBS",
    "FIELD_PARTIAL_TOKENS",
    "FIELD_PARTIAL_VERSIONS",
    "Engine",
    "GenOutput",
    "GenRequest",
    "LengthDistribution",
    "RunMetrics",
    "Scheduler",
    "SimulatedEngine",
    "SlotSpan",
    "StepMetrics",
    "StepResult",
    "TinyConfig",
    "TinyTransformer",
    "TorchEngine",
]
