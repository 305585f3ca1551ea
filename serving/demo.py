"""`make demo`: serve the exported repository on a real tritonserver, generate one PNG, shut down.

    python -m serving.demo [--output build/demo.png] [--prompt TEXT] [--size PX] [--variant cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from client.__main__ import main as client_main

from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT

from .server import TritonServer, free_ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--variant", default="cpu")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "build" / "demo.png")
    parser.add_argument("--prompt", default="a watercolor painting of a lighthouse by the sea at sunset")
    parser.add_argument("--size", type=int, default=256, help="height and width in pixels (default 256: the tiny model on a CPU)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    log = REPO_ROOT / "build" / "tritonserver.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(args.repository, args.variant, *free_ports(3), log_file=log)
    print(f"[demo] starting tritonserver ({args.variant} variant, log: {log}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with server:
        print(f"[demo] ready in {time.perf_counter() - start:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}", file=sys.stderr, flush=True)
        command = [args.prompt, "-o", str(args.output), "--url", server.http_url, "--seed", str(args.seed),
                   "--height", str(args.size), "--width", str(args.size)]
        print(f"[demo] python -m client {' '.join(repr(c) if ' ' in c else c for c in command)}", file=sys.stderr, flush=True)
        code = client_main(command)
    print("[demo] tritonserver stopped", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
