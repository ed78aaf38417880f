"""`CircuitError`: bad input to attribution graphs, interventions and the circuit viewer."""

from __future__ import annotations

from vitclt.errors import VitcltError


class CircuitError(VitcltError, ValueError):
    """A circuit cannot be built or an intervention run from these inputs; the message says how to fix it."""
