from serving.triton.postprocess_model import TritonPythonModel  # noqa: F401
