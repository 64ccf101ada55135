"""DistributedPOVRay: a POV-Ray scene rendered in row bands on the workers.

Each job carries the scene and the include files next to it, renders its band
with ``+SR``/``+ER`` on a worker that offers the ``povray`` tag, and returns
the band's rows; the bands are stitched into one PNG, equal pixel for pixel
to a single ``povray`` render of the scene at the same size.

Antialiasing: POV-Ray 3.7 renders in square blocks (``+BS``, 32 pixels by
default) laid from the first row rendered, and its adaptive sampler compares
pixels within a block. A band that starts or ends inside a block would sample
differently from the full render, whatever rows it adds on one side; so with
antialiasing on, each band renders the whole blocks that hold its rows (it
overlaps its neighbours by up to a block less a row) and keeps its own rows.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import png
from ..client import DSage
from ..distributed import DistributedFunction, Job
from ..job import JobWrapper
from ..protocol import Status

__all__ = ["DistributedPOVRay", "bands", "render_band", "scene_files"]

_INCLUDE = re.compile(rb'#include\s+"([^"]+)"')
_BLOCK = re.compile(r"[+-]BS(\d+)$", re.IGNORECASE)
_ANTIALIAS = re.compile(r"(\+A(\d|\.|$))|(antialias\s*=\s*(on|true|yes|1))", re.IGNORECASE)


def scene_files(scene: Path, extra: Sequence[Path] = ()) -> dict[str, bytes]:
    """The scene and what it includes from its own folder (followed through the
    included files), and ``extra`` files, by their names relative to the scene's
    folder. Includes not found there are POV-Ray's own (colors.inc...)."""
    root = scene.parent
    files: dict[str, bytes] = {}
    todo = [scene, *extra]
    while todo:
        path = todo.pop()
        rel = os.path.relpath(path, root)
        if rel in files:
            continue
        if rel.startswith(".."):
            raise ValueError(f"{path} is outside the scene's folder {root}: it cannot be shipped")
        files[rel] = path.read_bytes()
        for name in _INCLUDE.findall(files[rel]):
            inc = root / name.decode()
            if inc.is_file():
                todo.append(inc)
    return files


def bands(height: int, splits: int, block: int | None) -> list[tuple[int, int, int, int]]:
    """``splits`` row bands: (first, end) rows kept and (first, end) rows rendered
    (whole blocks of ``block`` rows around them, or just them when ``block`` is None)."""
    splits = max(1, min(splits, height))
    out = []
    for i in range(splits):
        a, b = height * i // splits, height * (i + 1) // splits
        if block:
            out.append((a, b, a // block * block, min(height, -(-b // block) * block)))
        else:
            out.append((a, b, a, b))
    return out


def render_band(scene: str, width: int, height: int, first: int, end: int,
                options: list[str]) -> png.Image:
    """On the worker (in the job's folder, holding the scene's files): render rows
    ``first`` to ``end`` (exclusive) and return just those rows."""
    cmd = ["povray", "-D", f"+I{scene}", "+Oband.png", "+FN", f"+W{width}", f"+H{height}",
           f"+SR{first + 1}", f"+ER{end}", *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists("band.png"):
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"povray failed (exit {done.returncode}) on rows {first}-{end}:\n{tail}")
    image = png.read("band.png")
    return png.Image(width, end - first, image.color_type, image.bit_depth,
                     image.rows[first:end])


class DistributedPOVRay(DistributedFunction):
    """Render ``scene`` (a .pov file) at ``width`` x ``height`` in ``splits`` row
    bands on workers offering the ``povray`` tag, and write the PNG ``output``.
    ``options`` are povray's command-line options (a list, or one string):
    ``+A0.3`` for antialiasing, say; ``include`` lists more files to ship (an
    image map...) in the scene's folder. ``result`` is the output's path."""

    def __init__(self, dsage: DSage, scene: str | os.PathLike[str], width: int, height: int,
                 splits: int, output: str | os.PathLike[str] = "out.png",
                 options: Sequence[str] | str = (), include: Sequence[str] = (),
                 name: str | None = None, progress: bool = False, **job_options: Any) -> None:
        super().__init__(dsage, name=name, progress=progress)
        scene_path = Path(scene).resolve()
        if not scene_path.is_file():
            raise FileNotFoundError(f"no POV-Ray scene at {scene_path}")
        for what, v in (("width", width), ("height", height), ("splits", splits)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what}={v!r}: give a positive int")
        self.width, self.height = width, height
        self.output = Path(output).resolve()
        self.options = shlex.split(options) if isinstance(options, str) else list(options)
        block = next((int(m.group(1)) for o in self.options
                      if (m := _BLOCK.match(o))), 32)
        antialias = any(_ANTIALIAS.match(o) for o in self.options)
        files = scene_files(scene_path, [Path(p).resolve() for p in include])
        self.bands = bands(height, splits, block if antialias else None)
        self._rows: dict[int, list[bytes]] = {}
        self._format: tuple[int, int] | None = None
        job_options.setdefault("requires", ["povray"])
        for i, (a, b, first, end) in enumerate(self.bands):
            self.outstanding_jobs.append(Job(
                func=render_band, args=(os.path.relpath(scene_path, scene_path.parent),
                                        width, height, first, end, self.options),
                files=files, tag=i, **job_options))

    def process_result(self, job: JobWrapper) -> None:
        if job.status != Status.COMPLETED:
            raise RuntimeError(f"a band failed ({job.status}): {job.error}")
        i = self.job_of(job).tag
        a, b, first, _ = self.bands[i]
        band: png.Image = job.result()
        self._format = (band.color_type, band.bit_depth)
        self._rows[i] = band.rows[a - first:b - first]
        if len(self._rows) == len(self.bands):
            rows = [r for k in range(len(self.bands)) for r in self._rows[k]]
            png.write(str(self.output), png.Image(self.width, self.height, *self._format, rows))
            self.result = self.output
            self.done = True
