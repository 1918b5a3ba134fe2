"""vpsurgery: a torch.fx model-surgery compiler for variational structured pruning."""
from vpsurgery.passes.gate.modules import ChannelGate, ChannelMask, Gate, SectionGate
from vpsurgery.passes.capture.trace import ExampleInputError, TraceError
from vpsurgery.passes.shrink import ShrinkError
from vpsurgery.train import FitResult, Pruner, TrainingDiverged, fit, objective, recalibrate_batchnorm
from vpsurgery.surgery import gates, kept_map, plan, replay, report, shrink, wrap
from vpsurgery import rules
from vpsurgery.rules import register_rule

__all__ = ["fit", "FitResult", "TrainingDiverged", "Pruner", "objective", "recalibrate_batchnorm", "wrap", "gates",
           "shrink", "plan", "report",
           "kept_map", "replay", "Gate", "ChannelGate", "SectionGate", "ChannelMask",
           "TraceError", "ExampleInputError", "ShrinkError", "rules", "register_rule"]
__version__ = "0.1.0"
