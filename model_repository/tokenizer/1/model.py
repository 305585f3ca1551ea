from serving.triton.tokenizer_model import TritonPythonModel  # noqa: F401
