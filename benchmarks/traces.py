"""Triton's request traces (`TritonServer(trace_file=...)`, tritonserver's `--trace-config`, level TIMESTAMPS)
read back: each traced request with its model, its parent (a BLS caller's request: serving/triton/common.py
`traced`), the client's request id and its timestamps (ns, one clock for the whole server).

Triton writes them as JSON lists of entries, each naming the trace `id` and either the request
({"model_name", "parent_id", "request_id"}) or timestamps ({"timestamps": [{"name", "ns"}]}), to
FILE.0, FILE.1 ... (one file per `log-frequency` traces)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Traced:
    """One traced request."""

    id: int
    model: str = ""
    parent: int | None = None
    request_id: str = ""
    # REQUEST_START, QUEUE_START, COMPUTE_START ... GRPC_SEND_END; of stamps repeated per response
    # (GRPC_SEND_START and _END), the last: the final response's. 2.51 stamps INFER_RESPONSE_COMPLETE for a
    # decoupled request's first response only.
    ns: dict[str, int] = field(default_factory=dict)
    children: list[Traced] = field(default_factory=list)

    def child(self, model: str) -> Traced:
        """The one request this one made to `model` (BLS)."""
        found = [c for c in self.children if c.model == model]
        if len(found) != 1:
            raise ValueError(f"trace {self.id} ({self.model}): {len(found)} calls of {model}, expected one")
        return found[0]

    def ms(self, start: str, end: str) -> float:
        """Milliseconds from timestamp `start` to timestamp `end` of this request."""
        return (self.ns[end] - self.ns[start]) / 1e6

    @property
    def span_ms(self) -> float:
        """From its arrival to its end: what its caller waited for it."""
        return self.ms("REQUEST_START", "REQUEST_END")

    @property
    def compute_ms(self) -> float:
        """Its model's compute_input + compute_infer (as in Triton's statistics); 0 for a request the
        response cache answered (it has no compute)."""
        if "COMPUTE_START" not in self.ns:
            return 0.0
        return self.ms("COMPUTE_START", "COMPUTE_OUTPUT_START")


def read_traces(first_file: Path) -> list[Traced]:
    """The root requests (no parent) of every trace file written for `first_file`'s name (FILE, FILE.0,
    FILE.1 ...), in the order they arrived, each with its BLS callees under it."""
    requests: dict[int, Traced] = {}
    for path in sorted(first_file.parent.glob(first_file.name + "*")):
        text = path.read_text().strip()
        if not text:
            continue
        for entry in json.loads(text):
            request = requests.setdefault(entry["id"], Traced(entry["id"]))
            if "model_name" in entry:
                request.model, request.parent = entry["model_name"], entry.get("parent_id")
                request.request_id = str(entry.get("request_id", ""))
            for stamp in entry.get("timestamps", ()):  # a decoupled request's response stamps repeat: its last
                request.ns[stamp["name"]] = max(int(stamp["ns"]), request.ns.get(stamp["name"], 0))
    roots = []
    for request in requests.values():
        if request.parent is not None and request.parent in requests:
            requests[request.parent].children.append(request)
        elif request.parent is None:
            roots.append(request)
    return sorted(roots, key=lambda request: request.ns.get("REQUEST_START", 0))
