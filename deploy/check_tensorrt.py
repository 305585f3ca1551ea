"""Build-time check of deploy/Dockerfile: the TensorRT Python wheel that builds the plans (the
engine-build Job) must be the TensorRT that the Triton container's tensorrt backend loads them
with; a plan built by another version fails to load. Exit 1, naming both versions, when they differ.

    python3 deploy/check_tensorrt.py 10.13.3.9
"""

from __future__ import annotations

import ctypes
import sys


def container_version(major: str) -> str:
    """The version of the container's libnvinfer (getInferLibVersion: major*10000 + minor*100 + patch)."""
    code = ctypes.CDLL(f"libnvinfer.so.{major}").getInferLibVersion()
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 deploy/check_tensorrt.py TENSORRT_VERSION", file=sys.stderr)
        return 2
    wanted = argv[0]
    import tensorrt  # the wheel installed by the Dockerfile

    try:
        container = container_version(wanted.split(".")[0])
    except OSError as error:
        print(f"error: cannot load the container's TensorRT (libnvinfer.so.{wanted.split('.')[0]}): {error}", file=sys.stderr)
        return 1
    wheel = ".".join(tensorrt.__version__.split(".")[:3])
    if not (wheel == container == ".".join(wanted.split(".")[:3])):
        print(f"error: TENSORRT_VERSION={wanted}, the pip wheel is TensorRT {tensorrt.__version__} and the Triton "
              f"container ships TensorRT {container}: plans built by the wheel would not load in the server. Set the "
              f"build argument TENSORRT_VERSION to the container's version ({container}.x, see NVIDIA's release notes "
              "for this TRITON_RELEASE).", file=sys.stderr)
        return 1
    print(f"TensorRT {container}: the wheel ({tensorrt.__version__}) and the Triton container agree")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
