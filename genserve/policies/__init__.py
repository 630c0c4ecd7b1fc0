"""Scheduling policies: one interface (`Policy.schedule(state) -> Plan`), chosen by name."""

from . import baselines, genserve  # noqa: F401  (registration)
from .base import (Assignment, Cluster, InFlight, Plan, Policy, SchedulerState, make_policy,
                   policy_names, register)

__all__ = ["Assignment", "Cluster", "InFlight", "Plan", "Policy", "SchedulerState", "make_policy",
           "policy_names", "register"]
