"""Run ``bawa-export`` and SIGKILL it at a named point: ``python tests/kill_export.py POINT EXPORT-ARGS...``.

The resume tests (``tests/test_resume.py``) need kills that land at an exact step, not after a guessed delay,
so this wraps one function of the exporter to kill its own process (SIGKILL: no cleanup, no ``finally``)
at that step. Nothing in the package knows about it. Points:

- ``calibration``: while block 0's calibration inputs are computed; ``.OUT.partial`` exists, no progress record.
- ``block:K``: as block K starts (K = 0: only the calibration inputs and the non-block shard are recorded).
- ``shard:K``: while shard file K is written: the file is cut to half its bytes, as a kill mid-write leaves it.
- ``record:K``: after block K-1's shard and the next calibration inputs are written, before the progress
  record that names them.
- ``commit``: after the last block, the config and the report, before the index.
- ``publish``: index written and progress record dropped, before the directory is renamed to OUT.
- ``swap``: with an existing OUT (``--overwrite``): after it is renamed aside, before the new one takes its place.
- ``published``: right after the rename (OUT is complete).

Exit status 3 if the run ended without reaching the point (the test then has nothing to resume).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Wrap the function in which ``point`` lies so that it kills this process there."""
    from bawa_vllm.modeling import checkpoint
    from bawa_vllm.pruning import engine

    name, _, arg = point.partition(":")
    if name == "calibration":
        engine.calibration_hidden = lambda *a, **k: die()
    elif name == "block":
        real_block = engine._prune_block

        def prune_block(decoder, runner, method, cfg, i, *rest):
            if i == int(arg):
                die()
            return real_block(decoder, runner, method, cfg, i, *rest)

        engine._prune_block = prune_block
    elif name == "shard":
        real_save = checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if Path(path).name.startswith(f"model-{int(arg):05d}-of-"):
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()

        checkpoint.save_file = save_file
    elif name == "record":
        real_record = checkpoint.CheckpointWriter.save_progress

        def save_progress(self, progress):
            if progress["blocks_done"] == int(arg):
                die()
            real_record(self, progress)

        checkpoint.CheckpointWriter.save_progress = save_progress
    elif name == "commit":
        checkpoint.CheckpointWriter.commit = lambda self: die()
    elif name == "publish":
        checkpoint.publish = lambda src, out: die()
    elif name == "swap":
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            if Path(dst).name.startswith(f".{Path(src).name}.old-"):
                die()

        os.replace = replace  # the module checkpoint.py calls it through
    elif name == "published":
        real_publish = checkpoint.publish

        def publish(src, out):
            real_publish(src, out)
            die()

        checkpoint.publish = publish
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1])
    from bawa_vllm.cli.export import main

    main(sys.argv[2:])
    sys.exit(3)
