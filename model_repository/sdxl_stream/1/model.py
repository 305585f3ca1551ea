from serving.triton.stream_model import TritonPythonModel  # noqa: F401
