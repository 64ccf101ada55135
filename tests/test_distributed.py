"""DistributedFunction and its examples (issue "DistributedFunction, distributed
factoring and POV-Ray rendering"): jobs submitted from process_result, one
processing thread in completion order, kills once done, stop and restore from a
new client, files shipped with jobs; DistributedFactor on every kind of n;
DistributedPOVRay against a single render; the povray tag."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import dsage
from dsage import png
from dsage.capabilities import offered_tags
from dsage.dist_functions import DistributedFactor, DistributedPOVRay
from dsage.dist_functions.ecm import (
    PROBABLE_BPSW, PROVEN_MR, PROVEN_TRIAL, certify, ecm_curve, perfect_power,
)
from dsage.distributed import DistributedFunction, Job, restore
from dsage.job import JobWrapper
from dsage.protocol import Status

from .conftest import Procs, skip_or_fail, wait_for

P20 = 99757102641179993489
Q21 = 698630645567728179191
R10 = 1815623053


class Chain(DistributedFunction):
    """Counts to ``target`` one job at a time: each result submits the next job.
    With ``sleeper``, a long job runs beside the chain (killed once done)."""

    def __init__(self, dsage: dsage.DSage, target: int, nap: float = 0.0,
                 sleeper: bool = False, fail_at: int | None = None, **kw: Any) -> None:
        super().__init__(dsage, **kw)
        self.target, self.nap, self.fail_at = target, nap, fail_at
        self.seen: list[int] = []
        self.threads: set[str] = set()
        if sleeper:
            self.outstanding_jobs.append(Job("import time; time.sleep(120)", tag="sleeper"))
        self.outstanding_jobs.append(self._step(1))

    def _step(self, k: int) -> str:
        return f"import time; time.sleep({self.nap}); {k}"

    def process_result(self, job: JobWrapper) -> None:
        self.threads.add(threading.current_thread().name)
        k = job.result()
        if k == self.fail_at:
            raise ValueError(f"no liking for {k}")
        self.seen.append(k)
        if k >= self.target:
            self.result, self.done = list(self.seen), True
        else:
            self.outstanding_jobs.append(self._step(k + 1))


class Collect(DistributedFunction):
    """Runs the jobs it is given; ``result`` maps each job's tag to its result."""

    def __init__(self, dsage: dsage.DSage, jobs: list[Job], **kw: Any) -> None:
        super().__init__(dsage, **kw)
        self.outstanding_jobs.extend(jobs)
        self.result = {}
        self.order: list[Any] = []

    def process_result(self, job: JobWrapper) -> None:
        tag = self.job_of(job).tag
        self.order.append(tag)
        self.result[tag] = job.result()


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


# --- DistributedFunction


def test_process_result_submits_more_jobs_on_one_thread_and_done_kills_what_runs(
        cluster: dsage.DSage) -> None:
    run = Chain(cluster, target=4, sleeper=True)
    assert run.start() is run
    assert run.wait(60) == [1, 2, 3, 4]
    assert run.done and run.threads == {f"dsage-{run.name}"}
    assert run.elapsed > 0 and not run.running
    sleeper = next(w for w, j in run.jobs.values() if j.tag == "sleeper")
    wait_for(lambda: sleeper.status == Status.KILLED, 30, "the sleeping job to be killed")
    names = {j.name for j in cluster.get_my_jobs(name=run.name)}
    assert names == {run.name} and len(cluster.get_my_jobs(name=run.name)) == 5


def test_results_are_processed_in_the_order_the_jobs_ended(cluster: dsage.DSage) -> None:
    jobs = [Job(f"import time; time.sleep({t}); {t}", tag=t) for t in (3.0, 0.0, 0.5)]
    run = Collect(cluster, jobs)
    with run:
        assert run.wait(60) == {3.0: 3.0, 0.0: 0.0, 0.5: 0.5}  # over when no job is left
    ended = sorted(run.jobs.values(), key=lambda wj: wj[0].finished or 0)
    assert run.order == [j.tag for _, j in ended] == [0.0, 0.5, 3.0]


def test_jobs_carry_files_code_and_calls_and_their_options(cluster: dsage.DSage) -> None:
    jobs = [Job("open('data.txt').read()", files={"data.txt": "hello"}, tag="code"),
            Job(func=read_bytes, args=("sub/x.bin",), files={"sub/x.bin": b"\0\1"}, tag="call",
                priority=1, timeout=30),
            Job(func=divmod, args=(7,), kwargs={}, tag="bad")]
    run = Collect(cluster, jobs[:2]).start()
    assert run.wait(60) == {"code": "hello", "call": b"\0\1"}
    with pytest.raises(TypeError, match="unknown job option"):
        Job("1", colour="red")
    with pytest.raises(ValueError, match="relative path"):
        Job("1", files={"../x": b""})
    with pytest.raises(ValueError, match="priority"):
        Job("1", priority=99)
    with pytest.raises(ValueError, match="kind"):
        Job("1", kind="perl")
    with pytest.raises(TypeError, match="code or func"):
        Job()
    failing = Collect(cluster, [jobs[2]]).start()
    with pytest.raises(dsage.DSageError, match="TypeError|JobError"):
        failing.wait(60)


def test_an_error_in_process_result_ends_the_run_and_kills_its_jobs(cluster: dsage.DSage) -> None:
    run = Chain(cluster, target=5, sleeper=True, fail_at=2).start()
    with pytest.raises(dsage.DSageError, match="no liking for 2"):
        run.wait(60)
    sleeper = next(w for w, j in run.jobs.values() if j.tag == "sleeper")
    wait_for(lambda: sleeper.status == Status.KILLED, 30, "the sleeping job to be killed")


def test_leaving_the_with_block_early_kills_the_open_jobs(cluster: dsage.DSage) -> None:
    with pytest.raises(KeyError):
        with Chain(cluster, target=3, sleeper=True) as run:
            wait_for(lambda: any(w.status == Status.PROCESSING for w, j in run.jobs.values()
                                 if j.tag == "sleeper"), 30, "the sleeper to run")
            raise KeyError("leave")
    sleeper = next(w for w, j in run.jobs.values() if j.tag == "sleeper")
    wait_for(lambda: sleeper.status == Status.KILLED, 30, "the sleeping job to be killed")


def test_progress_view_counts_the_jobs_as_they_are_submitted(cluster: dsage.DSage) -> None:
    run = Chain(cluster, target=3, progress=True).start()
    run.wait(60)
    assert run._view is not None
    counts = run._view.snapshot()
    assert counts.total == 3 and counts.completed == 3


def test_a_stopped_run_resumes_from_the_broker_in_a_new_client(procs: Procs) -> None:
    d = procs.up()
    run = Chain(d, target=6, nap=0.4).start()
    wait_for(lambda: len(run.seen) >= 2, 60, "two results")
    run.stop()  # usually with job 3 running
    d.close()
    d2 = procs.client()
    wait_for(lambda: all(j.done() for j in d2.get_my_jobs(name=run.name)), 30,
             "the run's jobs to end")  # all replayed (the factoring test follows live ones)
    again = restore(d2, run.name)
    assert isinstance(again, Chain) and again.name == run.name
    assert again.wait(60) == [1, 2, 3, 4, 5, 6]
    jobs = d2.get_my_jobs(name=run.name, limit=None)
    assert len(jobs) == 6 and all(j.status == Status.COMPLETED for j in jobs)  # none twice
    assert sorted(j.result() for j in jobs) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(dsage.DSageError, match="no run named"):
        restore(d2, "nothing-of-that-name")


def test_stop_from_process_result_submits_nothing_more(cluster: dsage.DSage) -> None:
    class StopAtTwo(Chain):
        def process_result(self, job: JobWrapper) -> None:
            super().process_result(job)
            if len(self.seen) == 2:
                self.stop()

    run = StopAtTwo(cluster, target=5).start()
    assert run.wait(60) is None and run.seen == [1, 2] and not run.done
    assert len(run.jobs) == 2
    with pytest.raises(RuntimeError, match="not started"):
        Chain(cluster, target=1).wait(1)


def test_a_stopped_factoring_resumes_in_a_new_client(procs: Procs) -> None:
    d = procs.up()
    a, b = 1000000000039, 10000000000037
    run = DistributedFactor(d, a * b * a * 3, sage=False).start()
    wait_for(lambda: len(run.jobs) >= 4, 30, "ECM jobs")
    run.stop()
    d.close()
    again = DistributedFactor.restore(procs.client(), run.name)
    assert again.parallel == run.parallel and again.sage is False
    assert again.wait(120) == [(3, 1), (a, 2), (b, 1)]


# --- number theory (pure)


def test_certify_proves_small_primes_and_names_bpsw_above_the_proven_range() -> None:
    small = [n for n in range(2, 3000) if all(n % d for d in range(2, int(n ** 0.5) + 1))]
    assert [n for n in range(3000) if certify(n)] == small
    assert certify(2) == certify(41) == certify(1847) == PROVEN_TRIAL
    assert certify(P20) == certify(Q21) == PROVEN_MR
    assert certify(10**30 + 57) == PROBABLE_BPSW
    # strong pseudoprimes to several bases, and a Carmichael number
    for n in (3215031751, 2152302898747, 3474749660383, 561, 3825123056546413051,
              318665857834031151167461):
        assert certify(n) is None
    assert certify(P20 * Q21) is None and certify((10**30 + 57) ** 2) is None


def test_perfect_powers() -> None:
    assert perfect_power(3 ** 12) == (3, 12) and perfect_power(12 ** 6) == (12, 6)
    assert perfect_power(R10 ** 7) == (R10, 7) and perfect_power(P20 * Q21) == (P20 * Q21, 1)


def test_one_curve_finds_a_small_factor_by_stage_two() -> None:
    n = 1000000000039 * 10000000000037
    found = [ecm_curve(n, s, 2000, 200_000) for s in range(6, 40)]
    assert any(f in (1000000000039, 10000000000037) for f in found)
    assert all(f == 1 or n % f == 0 for f in found)


# --- DistributedFactor


@pytest.mark.parametrize("n, expected", [
    (1, []), (2, [(2, 1)]), (360, [(2, 3), (3, 2), (5, 1)]), (97, [(97, 1)]),
    (2 ** 61 - 1, [(2 ** 61 - 1, 1)]), (10**30 + 57, [(10**30 + 57, 1)]),
    (R10 ** 5, [(R10, 5)]), ((10**30 + 57) ** 2 * 8, [(2, 3), (10**30 + 57, 2)]),
])
def test_factor_without_jobs_when_local_work_suffices(cluster: dsage.DSage, n: int,
                                                      expected: list[tuple[int, int]]) -> None:
    run = DistributedFactor(cluster, n).start()
    assert run.wait(30) == expected
    assert set(run.certificates) == {p for p, _ in expected}
    assert not run.jobs  # no job was needed


def test_factor_repeated_factors_found_by_ecm(cluster: dsage.DSage) -> None:
    a, b = 1000000000039, 10000000000037
    run = DistributedFactor(cluster, a ** 2 * b * 7, sage=False).start()
    assert run.wait(120) == [(7, 1), (a, 2), (b, 1)]
    assert run.certificates[a] == PROVEN_MR and run.certificates[7] == PROVEN_TRIAL
    assert any(j.kind == "function" for j, _ in run.jobs.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_factor_the_issues_number_within_three_minutes_on_two_slots(
        cluster: dsage.DSage) -> None:
    n = P20 * Q21 * R10 ** 2
    start = time.monotonic()
    run = DistributedFactor(cluster, n, sage=False).start()  # pure-Python ECM, on any worker
    assert run.wait(180) == sorted([(P20, 1), (Q21, 1), (R10, 2)])
    took = time.monotonic() - start
    assert took < 180
    assert all(c == PROVEN_MR for c in run.certificates.values())
    print(f"factored {n} in {took:.1f} s with {len(run.jobs)} jobs")


# --- POV-Ray

#: the guide's example scene: it includes a file of its folder, which includes another
EXAMPLE_SCENE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "scene"


def _scene(tmp_path: Path) -> Path:
    folder = tmp_path / "scene"
    shutil.copytree(EXAMPLE_SCENE, folder)
    return folder / "scene.pov"


def _single_render(scene: Path, out: Path, width: int, height: int, options: list[str]) -> png.Image:
    subprocess.run(["povray", "-D", "-GA", f"+I{scene.name}", f"+O{out}", "+FN", f"+W{width}",
                    f"+H{height}", *options], cwd=scene.parent, check=True, capture_output=True,
                   timeout=120)
    return png.read(str(out))


@pytest.fixture
def povray() -> None:
    if shutil.which("povray") is None:
        skip_or_fail("povray is not installed (apt-get install povray)")


@pytest.mark.parametrize("options, splits", [("", 4), ("+A0.3", 3), ("+A0.1 +AM2 +R2", 5)])
def test_povray_bands_stitch_to_the_single_render(povray: None, cluster: dsage.DSage,
                                                  tmp_path: Path, options: str,
                                                  splits: int) -> None:
    scene = _scene(tmp_path)
    out = tmp_path / "out.png"
    run = DistributedPOVRay(cluster, scene, 160, 120, splits, output=out, options=options)
    assert run.start().wait(120) == out
    assert len(run.jobs) == splits
    stitched = png.read(str(out))
    single = _single_render(scene, tmp_path / "single.png", 160, 120, options.split())
    assert (stitched.width, stitched.height) == (160, 120)
    assert stitched.rows == single.rows
    if options:  # bands render whole blocks: their rows overlap
        rendered = [(first, end) for _, _, first, end in run.bands]
        assert any(rendered[i][1] > rendered[i + 1][0] for i in range(len(rendered) - 1))


def test_png_reads_povrays_png_as_its_ppm(povray: None, tmp_path: Path) -> None:
    """The decoder against another format of the same render (libpng filters its
    rows adaptively, so every filter type is met)."""
    scene = _scene(tmp_path)
    image = _single_render(scene, tmp_path / "a.png", 97, 61, ["+A0.3"])
    subprocess.run(["povray", "-D", "-GA", "+Iscene.pov", "+Oa.ppm", "+FP", "+W97", "+H61",
                    "+A0.3"], cwd=scene.parent, check=True, capture_output=True, timeout=120)
    ppm = (scene.parent / "a.ppm").read_bytes()
    header = [line for line in ppm[:ppm.index(b"\n255\n") + 4].split(b"\n")
              if not line.startswith(b"#")]  # comment lines: the software, the date
    magic, size, maxval = header[0], header[1].split(), header[2]
    width, height, pixels = size[0], size[1], ppm[ppm.index(b"\n255\n") + 5:]
    assert (magic, int(width), int(height), int(maxval)) == (b"P6", 97, 61, 255)
    assert b"".join(image.rows) == pixels
    raw = zlib.decompress(b"".join(
        body for kind, body in png._chunks((tmp_path / "a.png").read_bytes()) if kind == b"IDAT"))
    filters = {raw[y * (97 * 3 + 1)] for y in range(61)}
    assert len(filters) > 1  # more than one filter type was decoded


def test_povray_failure_is_reported(povray: None, cluster: dsage.DSage, tmp_path: Path) -> None:
    scene = tmp_path / "broken.pov"
    scene.write_text("sphere { 0, 1 pigment { color Missing } }\n")
    run = DistributedPOVRay(cluster, scene, 40, 30, 2, output=tmp_path / "x.png").start()
    with pytest.raises(dsage.DSageError, match="povray failed"):
        run.wait(60)


def test_monitors_advertise_povray(povray: None, procs: Procs) -> None:
    procs.broker()
    procs.worker(1, tags=["big", "povray"], no_detect=True)
    procs.worker(1, tags=["big", "povray"])
    d = procs.client()
    procs.wait_workers(d, 2)
    # each tag once ('sage' too where Sage is installed); nothing added with no_detect
    detected = offered_tags(["big", "povray"])
    assert detected[:2] == ["big", "povray"] and set(detected) <= {"big", "povray", "sage"}
    assert sorted(w.tags for w in d.workers()) == sorted([["big", "povray"], detected])
    assert offered_tags(["big"])[:2] == ["big", "povray"]
    assert offered_tags(["big"], detect=False) == ["big"]


# --- PNG (pure)


def test_png_round_trip_and_filters() -> None:
    rows = [bytes((x * 7 + y * 13) % 256 for x in range(30)) for y in range(5)]
    image = png.Image(10, 5, 2, 8, rows)
    assert png.decode(png.encode(image)).rows == rows
    with pytest.raises(png.PNGError):
        png.decode(b"not a png")
