"""The compiler layer: named passes over a loss graph (`pipeline`), the source graph they share
(`graph`), the term plan (`plan`) and the fusion planner (`fusion`). Pure Python: no torch, no triton."""
