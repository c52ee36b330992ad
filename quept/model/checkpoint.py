"""The elastic checkpoint (docs/architecture.md §2, format version 1): writing atomically, loading with validation.

Layout of a checkpoint directory:
    config.json           the source model's Hugging Face config
    tokenizer files       Hugging Face format
    elastic.json          format version, widths, group size, ranks, profiles, sensitivity,
                          calibration record, sha256 per file and per tensor
    weights.safetensors   non-elastic tensors (norms, embeddings, biases), fp16
    elastic.safetensors   per linear <name>: .codes uint8 [N,K]; .scales/.mins fp16 [W,N,K/G];
                          .lora_a fp16 [R,K]; .lora_b fp16 [N,R]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quept.backends.base import ElasticWeights
from quept.errors import CheckpointError

FORMAT_VERSION = 1
META_FILE = "elastic.json"
DENSE_FILE = "weights.safetensors"
ELASTIC_FILE = "elastic.safetensors"
ELASTIC_SUFFIXES = ("codes", "scales", "mins", "lora_a", "lora_b")
STORE_DTYPE = torch.float16


@dataclass
class ElasticCheckpoint:
    """A loaded checkpoint: metadata, source config, dense tensors and elastic linears."""

    path: Path
    meta: dict[str, Any]
    hf_config: dict[str, Any]
    dense: dict[str, torch.Tensor]
    elastic: dict[str, ElasticWeights] = field(default_factory=dict)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.meta["widths"])

    @property
    def group_size(self) -> int:
        return int(self.meta["group_size"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def elastic_tensors(name: str, w: ElasticWeights) -> dict[str, torch.Tensor]:
    """The five stored tensors of one elastic linear, in storage dtypes."""
    return {
        f"{name}.codes": w.codes.to(torch.uint8).contiguous(),
        f"{name}.scales": w.scales.to(STORE_DTYPE).contiguous(),
        f"{name}.mins": w.mins.to(STORE_DTYPE).contiguous(),
        f"{name}.lora_a": w.lora_a.to(STORE_DTYPE).contiguous(),
        f"{name}.lora_b": w.lora_b.to(STORE_DTYPE).contiguous(),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_stages(out: Path) -> list[Path]:
    """Remove the staging directories of writes into `out` whose process is gone (a SIGKILL, a power
    cut: no `finally` ran). Their names carry the writer's pid: `.NAME.TAG-PID-RANDOM`."""
    removed = []
    for stage in out.parent.glob(f".{out.name}.*-*-*"):
        pid = stage.name[len(out.name) + 2:].split("-")[1]
        if stage.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


@contextmanager
def staged_dir(out: Path, tag: str = "tmp") -> Iterator[Path]:
    """A fresh directory beside `out` to write into: when the block ends normally it replaces `out` in
    one rename; when it raises (Ctrl-C included) it is removed, and `out` is untouched. Stages left by
    killed writers are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_checkpoint(
    out: Path,
    hf_config: dict[str, Any],
    dense: dict[str, torch.Tensor],
    elastic: dict[str, ElasticWeights],
    meta: dict[str, Any],
    tokenizer: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint into a temporary sibling directory, then rename it into place.

    An interrupted write (Ctrl-C, crash) leaves no half-written checkpoint at `out`.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite or choose another --out")
    with staged_dir(out) as tmp:
        dense_store = {k: v.to(STORE_DTYPE).contiguous() for k, v in dense.items()}
        elastic_store: dict[str, torch.Tensor] = {}
        for name, w in elastic.items():
            elastic_store.update(elastic_tensors(name, w))
        save_file(dense_store, str(tmp / DENSE_FILE))
        save_file(elastic_store, str(tmp / ELASTIC_FILE))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        first = next(iter(elastic.values()))
        full_meta = {
            "format_version": FORMAT_VERSION,
            "widths": list(first.widths),
            "group_size": first.group_size,
            "ranks": {str(b): r for b, r in zip(first.widths, first.ranks)},
            "elastic_layers": sorted(elastic),
            "profiles": {},
            "sensitivity": None,
            "calibration": None,
            **meta,
            "files": {DENSE_FILE: sha256_file(tmp / DENSE_FILE), ELASTIC_FILE: sha256_file(tmp / ELASTIC_FILE)},
            "tensor_sha256": {
                DENSE_FILE: {k: sha256_tensor(v) for k, v in dense_store.items()},
                ELASTIC_FILE: {k: sha256_tensor(v) for k, v in elastic_store.items()},
            },
        }
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes 0700; a checkpoint is read by other users (containers)
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def update_meta(path: Path, **fields: Any) -> None:
    """Rewrite fields of elastic.json in place (atomically); tensor files are untouched."""
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(fields)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (build one with `quept build --out {path}`)")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {path} is not a quept checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("widths", "group_size", "ranks", "elastic_layers", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: required field {key!r} is missing")
    return meta


def _load_tensor_file(path: Path, meta: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = path.name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    expected = meta["files"].get(name)
    if verify and expected is not None and sha256_file(path) != expected:
        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path} is truncated or corrupt (sha256 mismatch; cannot parse: {err})") from None
        hashes = meta.get("tensor_sha256", {}).get(name, {})
        bad = [k for k, v in tensors.items() if k in hashes and sha256_tensor(v) != hashes[k]]
        which = f"tensor(s) {', '.join(bad[:5])} altered" if bad else "contents differ from the recorded checksum"
        raise CheckpointError(f"{path}: sha256 mismatch, {which}")
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None


def _expect_shape(file: str, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{file}: tensor {key!r} is missing")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    return t


def load_checkpoint(path: str | Path, verify: bool = True) -> ElasticCheckpoint:
    """Load and validate a checkpoint; every failure is a CheckpointError naming file and tensor."""
    path = Path(path)
    meta = _read_meta(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing")
    hf_config = json.loads(config_path.read_text())
    dense = _load_tensor_file(path / DENSE_FILE, meta, verify)
    stored = _load_tensor_file(path / ELASTIC_FILE, meta, verify)
    widths = tuple(int(w) for w in meta["widths"])
    group = int(meta["group_size"])
    ranks = tuple(int(meta["ranks"][str(b)]) for b in widths)
    elastic: dict[str, ElasticWeights] = {}
    for name in meta["elastic_layers"]:
        codes = stored.get(f"{name}.codes")
        if codes is None:
            raise CheckpointError(f"{ELASTIC_FILE}: tensor {name + '.codes'!r} is missing")
        if codes.dim() != 2:
            raise CheckpointError(f"{ELASTIC_FILE}: tensor {name + '.codes'!r} must be 2-D, has shape {tuple(codes.shape)}")
        n, k = codes.shape
        if k % group:
            raise CheckpointError(f"{ELASTIC_FILE}: tensor {name + '.codes'!r}: group size {group} does not divide K={k}")
        _expect_shape(ELASTIC_FILE, stored, f"{name}.codes", (n, k), torch.uint8)
        scales = _expect_shape(ELASTIC_FILE, stored, f"{name}.scales", (len(widths), n, k // group), STORE_DTYPE)
        mins = _expect_shape(ELASTIC_FILE, stored, f"{name}.mins", (len(widths), n, k // group), STORE_DTYPE)
        lora_a = stored.get(f"{name}.lora_a")
        rank = 0 if lora_a is None else lora_a.shape[0]
        lora_a = _expect_shape(ELASTIC_FILE, stored, f"{name}.lora_a", (rank, k), STORE_DTYPE)
        lora_b = _expect_shape(ELASTIC_FILE, stored, f"{name}.lora_b", (n, rank), STORE_DTYPE)
        if max(ranks) > rank:
            raise CheckpointError(f"{ELASTIC_FILE}: tensor {name + '.lora_a'!r} has rank {rank} < the largest width rank {max(ranks)}")
        bias = dense.get(f"{name}.bias")
        elastic[name] = ElasticWeights(
            codes=codes, scales=scales, mins=mins, lora_a=lora_a, lora_b=lora_b,
            bias=None if bias is None else bias.float(), widths=widths, ranks=ranks, group_size=group,
        )
    return ElasticCheckpoint(path=path, meta=meta, hf_config=hf_config, dense=dense, elastic=elastic)
