"""ControlNets at full size: SDXL's ControlNet (diffusers/controlnet-canny-sdxl-1.0's architecture, random
weights) and the UNet that adds its residuals, exported as the repository exports them.

    python -m benchmarks.controlnet --skeletons DIR

For now this is the full-size part of `make bench-controlnet` (issue 34; the served figures follow with
the serving side): each graph exported in fp16 from random weights (the graph does not depend on them),
with the time and peak memory of each export, and kept without its weights in DIR
(`--skeletons tests/data/sdxl_graphs` refreshes the tests' copies: tests/test_full_size_graphs.py).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

from .throughput import log


def sdxl_controlnet(unet):
    """SDXL's ControlNet for `unet` (its down path, the published conditioning embedding), random init."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, load_weights_from_unet=False).eval()


def export_full_size(work: Path, skeletons: Path) -> dict:
    import torch

    from contract import layout, networks
    from export.modules import ControlNet, UNet
    from export.onnx_export import export_network
    from export.sdxl import build_component

    from .scale import keep_skeleton

    results = {}
    torch.manual_seed(60)
    unet = build_component("unet", dtype=torch.float16)
    for name in (networks.CONTROLNET_NAME, networks.UNET_CONTROL_NAME):
        start = time.perf_counter()
        if name == networks.CONTROLNET_NAME:
            module = ControlNet(sdxl_controlnet(unet).to(torch.float16))
        else:
            module = UNet(unet)
        out = layout.version_dir(work, name)
        export_network(module.eval(), networks.NETWORKS[name], networks.SDXL_DIMS, "fp16", out)
        del module
        gc.collect()
        results[name] = {"export_s": round(time.perf_counter() - start, 1),
                         "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        keep_skeleton(out / layout.ONNX_FILE, skeletons / f"{name}.onnx")
        log(f"full size: {name} exported in fp16, {results[name]}; skeleton in {skeletons}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.controlnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skeletons", type=Path, metavar="DIR", required=True,
                        help="where the full-size graphs are kept without their weights (tests/data/sdxl_graphs)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as tmp:
        export_full_size(Path(tmp), args.skeletons)
    return 0


if __name__ == "__main__":
    sys.exit(main())
