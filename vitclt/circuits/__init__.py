"""Circuits for images: attribution graphs of a CLT's local replacement model, pruning, interventions, a viewer.

`explain_image` / `explain_class` (vitclt.circuits.pipeline) build pruned graphs, `intervene` runs feature
interventions, `write_viewer` writes the static page; docs/circuits.md explains the method and its checks.
"""

from vitclt.circuits.aggregate import aggregate
from vitclt.circuits.errors import CircuitError
from vitclt.circuits.graph import Graph, attribute
from vitclt.circuits.intervene import Intervention, InterventionReport, intervene, parse_intervention
from vitclt.circuits.local import LocalReplacement
from vitclt.circuits.pipeline import Explanation, explain_class, explain_image
from vitclt.circuits.prune import Pruned, prune
from vitclt.circuits.viewer import write_viewer

__all__ = ["CircuitError", "Explanation", "Graph", "Intervention", "InterventionReport", "LocalReplacement", "Pruned",
           "aggregate", "attribute", "explain_class", "explain_image", "intervene", "parse_intervention", "prune",
           "write_viewer"]
