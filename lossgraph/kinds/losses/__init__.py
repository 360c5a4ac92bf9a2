"""The built-in loss kinds, one module each (see `lossgraph.kinds.loss.LossKind`)."""
