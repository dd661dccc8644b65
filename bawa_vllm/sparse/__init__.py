"""The 2:4-packed checkpoint format and the kernels that compute with it; neither imports vLLM."""
