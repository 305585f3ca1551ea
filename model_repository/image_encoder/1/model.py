# CPU variant (configs/cpu.pbtxt): the ONNX graph in this directory, run by ONNX Runtime.
# The production config (config.pbtxt) serves model.plan with the TensorRT backend and ignores this file.
from serving.triton.onnx_model import TritonPythonModel  # noqa: F401
