"""Reading a Hugging Face safetensors checkpoint tensor by tensor, and writing one shard by shard.

The whole model is never loaded: a block's tensors are read with a short-lived ``safe_open`` per
shard file (a handle kept open keeps the touched pages resident, so RSS would grow with depth), and
the output is written as one shard per block. The output directory is built under a temporary name
next to its destination and renamed into place only when complete, so an interrupted run leaves
no half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files never copied from the source directory: weights (rewritten by us) and non-safetensors weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def _open(path: Path):
    """``safe_open`` with a clear error for a truncated or corrupt file (no pickle is ever involved)."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # SafetensorError and OSError alike
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


class Checkpoint:
    """A local checkpoint directory: its config and a map from tensor name to shard file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.path}")
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: no config.json, not a Hugging Face checkpoint")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        # Same precedence as transformers' from_pretrained: a single file beats an index.
        single = self.path / SINGLE_FILE
        if single.is_file():
            with _open(single) as f:
                return {k: SINGLE_FILE for k in f.keys()}
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' of tensor -> file)") from None
            escaping = [f for f in set(weight_map.values()) if Path(f).name != f]
            if escaping:
                raise ValueError(f"{index}: shard names must be plain file names in the directory, got {escaping[0]!r}")
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.path}: shard files named by {INDEX_FILE} are missing: {missing}")
            return weight_map
        raise FileNotFoundError(
            f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported"
        )

    def config_dict(self) -> dict:
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path / 'config.json'} is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{self.path / 'config.json'}: expected a JSON object")
        return config

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def open(self, fname: str):
        """A short-lived ``safe_open`` of one shard (use it as a context manager)."""
        return _open(self.path / fname)

    def header(self, key: str) -> tuple[str, list[int]]:
        """(dtype code such as ``"BF16"``, shape) of a tensor, from the file header alone."""
        with self.open(self.weight_map[key]) as f:
            s = f.get_slice(key)
            return s.get_dtype(), s.get_shape()

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on CPU, in their stored dtype; each shard opened once and closed."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.weight_map:
                raise KeyError(f"{self.path}: tensor {key!r} not in the checkpoint")
            by_file.setdefault(self.weight_map[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            with _open(self.path / fname) as f:
                for name in names:
                    try:
                        out[name] = f.get_tensor(name)
                    except Exception as err:  # safetensors raises its own error types on corrupt data
                        raise ValueError(f"{self.path / fname}: cannot read tensor {name!r}: {err}") from None
        return out

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` (give it with its trailing dot), with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.read(self.keys(prefix)).items()}


PROGRESS_FILE = "progress.json"


def partial_dir(out: Path) -> Path:
    """Where a resumable export of ``out`` is built: ``.<out>.partial`` next to it (same filesystem, so the
    final rename is atomic)."""
    return out.parent / f".{out.name}.partial"


def publish(src: Path, out: Path) -> Path:
    """Move the finished directory ``src`` to ``out`` (replacing an existing ``out``) by renames only.

    An existing ``out`` is first renamed to ``.<out>.old-<pid>`` and removed after the new one is in place, so
    there is never a moment without a complete ``out`` or a complete ``src``; leftovers of an earlier publish
    that was killed between those steps (``.<out>.old-*``) are removed as well.
    """
    src.chmod(0o755)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(src, out)
    remove_stale_old(out)
    return out


def remove_stale_old(out: Path) -> None:
    """Remove the previous versions of ``out`` that :func:`publish` moved aside (``.<out>.old-*``)."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        logger.info("removing %s, the replaced previous version of %s", old, out)
        shutil.rmtree(old)


class CheckpointWriter:
    """Writes shards and the index into a temporary directory that becomes ``out`` on ``commit``.

    With ``resumable``, the directory is ``.<out>.partial`` next to ``out``: :meth:`save_progress`
    records what is finished after each step, a failed run keeps it once there is progress to keep,
    and ``resume=True`` continues from it. A ``.<out>.partial`` without a progress record (the run
    was killed before its first record) holds nothing that can be trusted, so ``resume=True`` then
    starts over, as it does when there is no partial directory at all: a retried job can always pass it.
    """

    def __init__(self, out: str | os.PathLike, num_shards: int, overwrite: bool = False, resumable: bool = False,
                 resume: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"output {self.out} already exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._next = 1
        self.progress: dict | None = None
        self.resumable = resumable or resume
        if not self.resumable:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            return
        self.tmp = partial_dir(self.out)
        state = self.tmp / PROGRESS_FILE
        if resume and state.is_file():
            saved = json.loads(state.read_text())
            self.weight_map, self.total_size, self._next = saved["weight_map"], saved["total_size"], saved["next"]
            self.progress = saved["progress"]
            recorded = set(self.weight_map.values())
            # a shard begun after the last record (maybe cut short by the kill), or a half-written *.tmp
            for stray in [*self.tmp.glob("model-*.safetensors"), *self.tmp.glob("*.tmp")]:
                if stray.name not in recorded:
                    stray.unlink()
            return
        if resume and self.tmp.exists():
            logger.info("--resume: %s has no finished step recorded (the run stopped before its first block "
                        "finished); starting from the first block", self.tmp)
        elif resume:
            logger.info("--resume: no unfinished export of %s (%s does not exist); starting from the first "
                        "block", self.out, self.tmp)
        elif self.tmp.exists():
            logger.info("discarding the unfinished export %s (pass --resume to continue it instead)", self.tmp)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def save_progress(self, progress: dict) -> None:
        """Record the finished shards and ``progress`` atomically (written last, after the data it names)."""
        self.progress = progress
        state = {"weight_map": self.weight_map, "total_size": self.total_size, "next": self._next,
                 "progress": progress}
        part = self.tmp / f"{PROGRESS_FILE}.tmp"
        part.write_text(json.dumps(state))
        os.replace(part, self.tmp / PROGRESS_FILE)

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> str:
        fname = f"model-{self._next:05d}-of-{self.num_shards:05d}.safetensors"
        self._next += 1
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(data, self.tmp / fname, metadata={"format": "pt"})
        for k, v in data.items():
            self.weight_map[k] = fname
            self.total_size += v.numel() * v.element_size()
        return fname

    def copy_side_files(self, source: Path) -> None:
        """Tokenizer, generation config and other small files; weights are never copied."""
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name != INDEX_FILE:
                shutil.copy2(item, self.tmp / item.name)

    def write_json(self, name: str, obj: dict) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def commit(self) -> Path:
        """Write the index last (atomically), drop the progress record, then move the directory into place.

        A run killed after the progress record is gone leaves a ``.<out>.partial`` with the index: complete,
        which the caller can check and :func:`publish` instead of redoing the export.
        """
        if self._next - 1 != self.num_shards:
            raise RuntimeError(f"wrote {self._next - 1} shards, expected {self.num_shards}")
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        part = self.tmp / f"{INDEX_FILE}.tmp"
        part.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        os.replace(part, self.tmp / INDEX_FILE)
        (self.tmp / PROGRESS_FILE).unlink(missing_ok=True)
        return publish(self.tmp, self.out)

    def abort(self) -> None:
        """Remove the temporary directory, unless it holds progress that ``--resume`` can continue."""
        if self.resumable and self.progress and self.progress.get("blocks_done", 0) > 0:
            logger.warning("export interrupted: %d blocks done are kept in %s; rerun with --resume to continue",
                           self.progress["blocks_done"], self.tmp)
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
