from serving.triton.denoiser_model import TritonPythonModel  # noqa: F401
