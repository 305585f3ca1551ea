from serving.triton.library_model import TritonPythonModel  # noqa: F401
