"""dsage: distributed computing from inside a script or an interactive session.

>>> import dsage
>>> D = dsage.start_all()        # a local broker and a monitor with 2 slots
>>> j = D('2+2')
>>> j.wait()
>>> j
4
"""

__version__ = "0.1.0"

from .client import DSage, MonitorInfo  # noqa: E402
from .cluster import ManagedProcess, StartError, server, start_all, worker  # noqa: E402
from .errors import (  # noqa: E402
    BrokerUnreachable, DSageError, ItemError, JobError, KeyRejected, RemoteTraceback,
    SubmitRejected, UnknownJob, UntrustedResultError,
)
from .job import JobWrapper, WorkerInfo  # noqa: E402
from .distributed import DistributedFunction, Job  # noqa: E402
from .keys import setup  # noqa: E402
from .progress import JobProgress, progress  # noqa: E402

__all__ = [
    "BrokerUnreachable", "DSage", "DSageError", "DistributedFunction", "Job", "ItemError", "JobError", "JobProgress",
    "JobWrapper", "KeyRejected", "ManagedProcess", "MonitorInfo", "RemoteTraceback",
    "StartError", "SubmitRejected", "UnknownJob", "UntrustedResultError", "WorkerInfo",
    "progress", "server", "setup", "start_all", "worker",
]
