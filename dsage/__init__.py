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
from .cluster import (  # noqa: E402
    Cluster, ManagedProcess, RemoteProcess, StartError, server, start_all, start_workers, worker,
)
from .errors import (  # noqa: E402
    BrokerUnreachable, DSageError, IncompatibleVersion, ItemError, JobCancelled, JobError,
    KeyRejected, RemoteTraceback, SubmitRejected, UnknownJob, UntrustedResultError,
)
from .distributed import DistributedFunction, Job  # noqa: E402
from .job import JobWrapper, WorkerInfo  # noqa: E402
from .keys import setup  # noqa: E402
from .progress import JobProgress, progress  # noqa: E402
from .slurm import SlurmJob, slurm_workers  # noqa: E402
from . import display as _display  # noqa: E402

_display.install()

__all__ = [
    "BrokerUnreachable", "Cluster", "DSage", "DSageError", "DistributedFunction",
    "IncompatibleVersion", "ItemError",
    "Job", "JobCancelled", "JobError", "JobProgress", "JobWrapper", "KeyRejected", "ManagedProcess",
    "MonitorInfo", "RemoteProcess", "RemoteTraceback", "SlurmJob", "StartError",
    "SubmitRejected", "UnknownJob", "UntrustedResultError", "WorkerInfo", "progress", "server",
    "setup", "slurm_workers", "start_all", "start_workers", "worker",
]
