"""Checkpoint format writers/readers as pure tensor functions, one module per format.

A format module receives codes/scales/zeros (or a ``methods.grid.QuantResult``) and returns
``{suffix: tensor}`` plus config metadata; it knows nothing about Hessians, models or files.
``gptq``: AutoGPTQ/GPTQModel layout (FORMATS.md §1), including the generic LSB-first bit packer.
"""
