"""The runtime layer: the compiled graph (`compiled`), its inputs, and the backends that compute a
head's terms behind one interface (`backend`): the reference math (`reference`, `reference_backend`,
gradients by autograd), the fused Triton kernels (`fused`, `autograd`), hidden-state chunks (`linear`),
and a vocabulary split across ranks (`parallel`)."""
