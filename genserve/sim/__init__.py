"""The simulator: the same policies, a virtual clock driven by the latency model."""

from .simulator import PlanError, SimConfig, Simulator

__all__ = ["PlanError", "SimConfig", "Simulator"]
