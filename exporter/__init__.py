"""medusa-trt exporter: Medusa heads, the graph-contract modules and the ONNX export.

``medusa-export`` (:mod:`exporter.cli`) turns a Hugging Face model folder and Medusa heads
into an artifact folder (:func:`exporter.export.export_artifact`), validated against
PyTorch (:mod:`exporter.validate`). Importing this package imports nothing heavy.
"""
