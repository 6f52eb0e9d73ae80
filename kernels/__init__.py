"""Stock-Triton kernels for jax_ep (framework-agnostic: they import only triton).

Installed as ``jax_ep.kernels``; in a source checkout ``jax_ep`` maps this folder in itself.
"""
