"""Quantization algorithms as pure tensor functions (no model plumbing, no I/O).

- ``grid``: the uniform integer grid (``QuantSpec``, ``find_params``, quantize/dequantize) and the
  ``QuantResult`` every weight-only method returns.
- ``hessian``: the calibration statistic GPTQ needs (``accumulate_hessian``, ``HessianAccumulator``).
- ``rtn``: round-to-nearest, the baseline.
- ``gptq``: the GPTQ solver (``prepare_hessian_inverse``, ``gptq_quantize``, ``weighted_error``).

Statistics are collected by the executor through ``hessian``; solvers never see a model.
"""
