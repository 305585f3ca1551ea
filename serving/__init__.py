"""Serving-side logic of the SDXL + LCM-LoRA model repository, importable and unit-tested.

The Triton Python models under model_repository/ are thin: they import `serving.triton.*`.
"""
