"""The spec layer: what a loss-graph file may contain (pydantic models, no torch), the YAML loader
with its source map, schedules, and the descriptions and docs generated from the models."""

from .models import LossGraphSpec, json_schema

__all__ = ["LossGraphSpec", "json_schema"]
