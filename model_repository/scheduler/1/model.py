from serving.triton.scheduler_model import TritonPythonModel  # noqa: F401
