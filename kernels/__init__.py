"""Triton kernels of lossgraph and their host-side launchers (installed as `lossgraph.kernels`)."""
