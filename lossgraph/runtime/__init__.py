"""The runtime layer: the compiled graph (`compiled`), its inputs, and the backends that compute a
head's terms (`reference` in PyTorch, `fused` Triton kernels, `linear` chunks of hidden states, and
`parallel` for a vocabulary split across ranks)."""
