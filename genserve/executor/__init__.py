"""One executor core for the simulator (virtual clock) and the engine (workers, real clock)."""

from .core import (Backend, Cancelled, Ended, ExecResult, ExecutorCore, Failed, Finishing,
                   Outcome, RolledBack, Stepped)
from .quanta import PlanError, Quantum, quantum_cost, validate_assignment

__all__ = ["Backend", "Cancelled", "Ended", "ExecResult", "ExecutorCore", "Failed", "Finishing",
           "Outcome", "PlanError", "Quantum", "RolledBack", "Stepped", "quantum_cost",
           "validate_assignment"]
