"""The live progress view in a real Jupyter kernel (jupyter_client + ipykernel), with
ipywidgets not importable: one output updated in place by its display id."""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

import dsage
from dsage import running

from .conftest import alive, skip_or_fail

#: the kernel's own code, before anything of dsage: ipywidgets cannot be imported
#: (rich's Live needs it in Jupyter and warns without it on every refresh)
SETUP = """
import sys
sys.modules['ipywidgets'] = None
import dsage
D = dsage.start_all(workers=1, port=0, home={home!r}, heartbeat=0.2)
print('pids', *[p.pid for p in D._cluster.processes()])
jobs = [D(f'import time; time.sleep(0.05); {{i}} * 2') for i in range(12)] + [D('1/0')]
"""


class Kernel:
    """A started kernel and its client; ``run`` executes a cell and returns its
    messages; every iopub message seen is kept in ``iopub``."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(cwd),
                                            startup_timeout=60)
        self.iopub: list[dict[str, Any]] = []

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.iopub.append(msg)
        return msg

    def run(self, code: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Execute ``code``; its iopub messages once the kernel is idle again (an error
        in the cell fails the test)."""
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + timeout
        mine: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            msg = self._next(0.5)
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            mine.append(msg)
            if msg["msg_type"] == "error":
                raise AssertionError("the cell failed:\n" + "\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return mine
        raise AssertionError(f"the cell did not finish within {timeout} s: {code!r}")

    def wait_iopub(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first iopub message (seen before or arriving now) for which ``cond`` holds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.iopub[seen:]:
                if cond(msg):
                    return msg
            seen = len(self.iopub)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self._next(0.2)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _text(msg: dict[str, Any]) -> str:
    return str(msg["content"].get("data", {}).get("text/plain", ""))


def test_progress_in_a_jupyter_kernel_without_ipywidgets(home: Path, tmp_path: Path) -> None:
    missing = [m for m in ("ipykernel", "jupyter_client") if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(f"the Jupyter kernel packages are not installed: {', '.join(missing)}")
    root = str(Path(dsage.__file__).resolve().parent.parent)
    env = {**os.environ, "DSAGE_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cwd = tmp_path / "notebook"  # not beside the home folder 'dsage'
    cwd.mkdir()
    pids: list[int] = []
    kernel = Kernel(env, cwd)
    try:
        setup = kernel.run(SETUP.format(home=str(home)))
        out = "".join(m["content"]["text"] for m in setup if m["msg_type"] == "stream")
        pids = [int(p) for line in out.splitlines() if line.startswith("pids ")
                for p in line.split()[1:]]
        # a cell ending in the view shows it once: as the output updated in place
        cell = kernel.run("p = dsage.progress(jobs, title='kernel')\np")
        shown = [m for m in cell if m["msg_type"] in ("display_data", "execute_result")]
        assert len(shown) == 1 and shown[0]["msg_type"] == "display_data", shown
        display_id = shown[0]["content"]["transient"]["display_id"]
        assert display_id and _text(shown[0]).startswith("kernel: ")
        assert "<progress" in shown[0]["content"]["data"]["text/html"]

        final = kernel.wait_iopub(
            lambda m: m["msg_type"] == "update_display_data"
            and m["content"]["transient"]["display_id"] == display_id
            and "13/13 done" in _text(m), 60, "the view's final update")
        assert "13/13 done, 1 failed, 0 running, 0 queued" in _text(final)
        html = final["content"]["data"]["text/html"]
        assert '<progress value="13" max="13"' in html and 'class="dsage-failed"' in html
        # the view ended by itself (its thread gone after the final update)
        kernel.run("assert p.wait(30) and p._closed, p\n"
                   "p._ticker.join(30)\n"
                   "assert not p._ticker.is_alive()")
        updates = [m for m in kernel.iopub if m["msg_type"] == "update_display_data"]
        assert all(m["content"]["transient"]["display_id"] == display_id for m in updates)
        assert "13/13 done" in _text(updates[-1])  # the last state shown: all done
        kernel.run("D.close()")
        stderr = "".join(m["content"]["text"] for m in kernel.iopub
                         if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
        assert "ipywidgets" not in stderr, stderr
        assert not [m for m in kernel.iopub if m["msg_type"] == "comm_open"]  # no widgets
    finally:
        kernel.shutdown()
        for pid in pids:  # the cluster ends with the kernel (exit-with-parent); surely so
            if alive(pid, group=True):
                os.killpg(pid, signal.SIGKILL)
        for b in running.brokers(home):
            os.killpg(b.pid, signal.SIGKILL)
