"""The spec layer: what a loss-graph file may contain (`nodes`, the building blocks, and `models`, the
document), the YAML loader with its source map, schedules, and the descriptions and docs generated
from the models. No torch."""
