"""Applications built on lossgraph's public API: the training demo and the benchmark suite."""
