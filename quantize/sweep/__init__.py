"""`quantize sweep`: a matrix of `quantize run` invocations, side by side on Ray.

    spec.py       the typed sweep file and its expansion into runs (each one `quantize run RECIPE --set ...`)
    resources.py  what each run asks the scheduler for, from config.json alone (no weights)
    worker.py     the body of one run's task (and of a shared calibration's): plain Python, no Ray
    ray_exec.py   the only module that imports Ray: the local or cluster instance, tasks, retries
    report.py     the final table and ``sweep.json``

Nothing here imports Ray at import time; only executing a sweep does (``ray_exec.execute``).
"""

from .spec import RunSpec, Sweep, expand, load_sweep

__all__ = ["RunSpec", "Sweep", "expand", "load_sweep"]
