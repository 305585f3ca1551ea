"""The LoRA library as the serving models use it: read a LoRA on a request's first use of its name,
stack a request's LoRAs with their scales, and pack a batch's samples into the two LoRA tensors of
a network (contract/loras.py has the layout).

A name is looked up in the library on every request (one stat of its info file), so a LoRA added
while the server runs is found by the next request, and a removed one is refused from then on; a
LoRA already read stays in this process's cache, keyed by its weights' sha256, so requests that
hold it finish with it, and a LoRA replaced under the same name is read again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract import loras
from contract.loras import LORA_NETWORKS, LoraError, LoraInfo, SiteTable


@dataclass(frozen=True)
class LoadedLora:
    info: LoraInfo
    # network -> {site name: (down [rank, down_width], up [out, rank])}
    weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes + u.nbytes for sites in self.weights.values() for d, u in sites.values())


class Library:
    """One process's view of the library (`<repository>-loras/`), with an LRU cache of read LoRAs
    bounded in bytes."""

    def __init__(self, repository: Path, tables: dict[str, SiteTable], dtype=np.float32, cache_bytes: int = 2 * 1024**3):
        self.repository, self.tables, self.dtype, self.cache_bytes = Path(repository), tables, dtype, cache_bytes
        self._cache: OrderedDict[tuple[str, str], LoadedLora] = OrderedDict()

    @classmethod
    def open(cls, repository: Path, dtype=np.float32, cache_bytes: int = 2 * 1024**3) -> "Library":
        return cls(repository, {network: SiteTable.read(repository, network) for network in LORA_NETWORKS}, dtype,
                   cache_bytes)

    def get(self, name: str) -> LoadedLora:
        """The LoRA installed under `name` now; LoraError naming `lora_names` when there is none."""
        loras.check_name(name)
        directory = loras.library_dir(self.repository) / name
        try:
            info = LoraInfo.read(directory)
        except FileNotFoundError:
            known = ", ".join(loras.installed(self.repository)) or "none"
            raise LoraError(f"lora_names: {name!r} is not in the LoRA library (installed: {known}); add it with "
                            f"`python -m export lora add {name} PATH`") from None
        key = (name, info.sha256)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        lora = self._read(directory, info)
        self._cache[key] = lora
        while len(self._cache) > 1 and sum(item.nbytes for item in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return lora

    def _read(self, directory: Path, info: LoraInfo) -> LoadedLora:
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(directory / loras.WEIGHTS_FILE))
        except FileNotFoundError:  # removed between its info and its weights
            raise LoraError(f"lora_names: {info.name!r} was removed from the LoRA library") from None
        weights: dict[str, dict] = {network: {} for network in self.tables}
        owner = {name: network for network, table in self.tables.items() for name in table.by_name()}
        for key in tensors:
            site_name, _, part = key.rpartition(".")
            if part != "down":
                continue
            network = owner.get(site_name)
            site = self.tables[network].by_name()[site_name] if network else None
            down, up = tensors[key], tensors.get(f"{site_name}.up")
            if site is None or up is None or down.shape[1] != site.down_width or up.shape[0] != site.out_features:
                raise LoraError(f"lora_names: {info.name!r} was added for another export of the model (its layer "
                                f"{site_name} does not fit this one); remove it and add it again")
            weights[network][site_name] = (down.astype(self.dtype, copy=False), up.astype(self.dtype, copy=False))
        return LoadedLora(info, weights)


def stack(table: SiteTable, parts: list[tuple[LoadedLora, float]], dtype=np.float32) -> tuple[np.ndarray, np.ndarray] | None:
    """One request's LoRAs on one network: down [rank, lora_in] and up [lora_out, rank], the LoRAs'
    ranks side by side, each up scaled by its request scale (diffusers' set_adapters weights). None
    when none of them touches the network."""
    used = [(lora, scale) for lora, scale in parts if lora.weights.get(table.network)]
    if not used:
        return None
    ranks = [max(d.shape[0] for d, _ in lora.weights[table.network].values()) for lora, _ in used]
    down = np.zeros((sum(ranks), table.lora_in), dtype)
    up = np.zeros((table.lora_out, sum(ranks)), dtype)
    offsets = dict(zip((s.name for s in table.sites), zip(table.down_offsets, table.up_offsets)))
    by_name = table.by_name()
    start = 0
    for (lora, scale), rank in zip(used, ranks):
        for site_name, (site_down, site_up) in lora.weights[table.network].items():
            site, (down_at, up_at) = by_name[site_name], offsets[site_name]
            r = site_down.shape[0]
            down[start:start + r, down_at:down_at + site.down_width] = site_down
            up[up_at:up_at + site.out_features, start:start + r] = site_up * np.asarray(scale, dtype)
        start += rank
    return down, up


def rank_bucket(rank: int, limit: int) -> int:
    """The rank a request's LoRA tensors are padded to: the next power of two (1 without LoRAs), so
    that Triton's dynamic batcher, which batches requests of equal shapes only, finds peers."""
    bucket = 1
    while bucket < rank:
        bucket *= 2
    return min(bucket, max(limit, rank))


def pack(table: SiteTable, samples: list[tuple[np.ndarray, np.ndarray] | None], rank: int | None = None,
         dtype=np.float32) -> dict[str, np.ndarray]:
    """A batch's LoRA tensors for one network, one row per sample (None: no LoRA, zeros), padded to
    `rank` (default: the largest in the batch, at least 1)."""
    needed = max([1] + [down.shape[0] for down, _ in (s for s in samples if s is not None)])
    rank = needed if rank is None else rank
    if rank < needed:
        raise ValueError(f"pack: rank {rank} is below the batch's {needed}")
    lora_down = np.zeros((len(samples), rank, table.lora_in), dtype)
    lora_up = np.zeros((len(samples), table.lora_out, rank), dtype)
    for i, stacked in enumerate(samples):
        if stacked is not None:
            down, up = stacked
            lora_down[i, :down.shape[0]] = down
            lora_up[i, :, :up.shape[1]] = up
    return {"lora_down": lora_down, "lora_up": lora_up}


def check_request(names: np.ndarray | None, scales: np.ndarray | None, max_loras: int, max_scale: float,
                  ) -> list[tuple[str, float]]:
    """The request inputs `lora_names` (BYTES [K]) and `lora_scales` (FP32 [K], default 1.0 each) as
    [(name, scale)]; LoraError naming the input for anything else."""
    if names is None or names.size == 0:
        if scales is not None and scales.size:
            raise LoraError(f"lora_scales: {scales.size} scales without lora_names; send one scale per name in lora_names")
        return []
    names = names.reshape(-1)
    if names.size > max_loras:
        raise LoraError(f"lora_names: {names.size} names is not accepted; expected at most {max_loras} LoRAs per request")
    decoded = []
    for raw in names:
        try:
            name = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise LoraError(f"lora_names: {bytes(raw)[:40]!r} is not UTF-8; expected LoRA names") from None
        decoded.append(loras.check_name(name))
    if len(set(decoded)) != len(decoded):
        raise LoraError(f"lora_names: {decoded} names a LoRA twice; name each once (its scale says how much)")
    if scales is None or scales.size == 0:
        values = [1.0] * len(decoded)
    else:
        values = [float(v) for v in scales.reshape(-1)]
        if len(values) != len(decoded):
            raise LoraError(f"lora_scales: {len(values)} scales for {len(decoded)} names in lora_names; "
                            "expected one scale per name")
        values = [loras.check_scale(v, max_scale) for v in values]
    return list(zip(decoded, values))


class ServingLoras:
    """What a serving model needs of the LoRAs: the library, the site tables and the graphs' dtype
    (the export's), and the LoRA tensors of a request."""

    def __init__(self, repository: Path, dtype: str, max_rank: int):
        missing = [n for n in LORA_NETWORKS if not loras.sites_path(repository, n).exists()]
        if missing:
            raise LoraError(f"{repository}: no {', '.join(f'{n}/1/{loras.SITES_FILE}' for n in missing)}; these graphs "
                            "were exported before per-request LoRAs: export again (`make export-tiny` or `python -m export onnx`)")
        self.dtype = np.float16 if dtype == "fp16" else np.float32
        self.library = Library.open(repository, self.dtype)
        self.tables = self.library.tables
        self.max_rank = max_rank  # the engines' lora_rank profile: max_loras x max_lora_rank

    def load(self, request: list[tuple[str, float]]) -> list[tuple[LoadedLora, float]]:
        """Read (or find cached) each named LoRA: what a request holds from its start to its end."""
        return [(self.library.get(name), scale) for name, scale in request]

    def tensors(self, network: str, held: list[tuple[LoadedLora, float]], rows: int) -> dict[str, np.ndarray]:
        """`rows` copies of the request's stacked LoRAs on `network`, rank padded to its bucket."""
        table = self.tables[network]
        stacked = stack(table, held, self.dtype)
        rank = 1 if stacked is None else stacked[0].shape[0]
        if rank > self.max_rank:
            raise LoraError(f"lora_names: the LoRAs' ranks add up to {rank}; this deployment's engines take at most "
                            f"{self.max_rank} (max_loras x max_lora_rank)")
        packed = pack(table, [stacked], rank_bucket(rank, self.max_rank), self.dtype)
        return {name: np.repeat(value, rows, axis=0) for name, value in packed.items()}
