"""Export a diffusers SDXL pipeline (LoRAs fused, fp16-fix VAE) to the ONNX graphs Triton serves."""
