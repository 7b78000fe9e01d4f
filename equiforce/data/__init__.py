"""Reading structures, neighbour lists, graphs, batching and dataset statistics."""

from equiforce.data.graph import Graph, atoms_to_graph, collate, config_to_graph, to_device
from equiforce.data.structure import Configuration

__all__ = ["Configuration", "Graph", "atoms_to_graph", "collate", "config_to_graph", "to_device"]
