"""The task registry: the metadata's ``task`` -> the object that serves it (see ``base.py``).

Adding a task means adding one module here, ``handler/tasks/<family>.py``, that defines a
:class:`handler.tasks.base.Task` instance (its parameters, transform and device geometry, postprocessor
inputs and outputs, and JSON), one entry in :data:`TASKS` below, and its export entry in ``export/tasks.py``
(docs/architecture.md, "Adding a task"). The exporter writes the same name into ``metadata.json``; nothing
else in the handler, the exporter, the export check or the benchmark names a task.
"""

from __future__ import annotations

from handler.contract import ArtifactError
from handler.tasks.base import PreparedImage, ResponseOptions, Task
from handler.tasks.classify import CLASSIFY
from handler.tasks.detect import DETECT, OBB, POSE
from handler.tasks.depth import DEPTH
from handler.tasks.rtdetr import RTDETR
from handler.tasks.segment import SEGMENT
from handler.tasks.semantic import SEMANTIC

TASKS: dict[str, Task] = {t.name: t for t in (DETECT, POSE, SEGMENT, OBB, CLASSIFY, SEMANTIC, DEPTH, RTDETR)}

# Every request parameter of every task, in registry order (unknown-parameter messages list them).
TASK_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(name for t in TASKS.values() for name in t.parameters))


def task_for(name: str) -> Task:
    """The task object of a model whose metadata says ``task: name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ArtifactError(f"task {name!r} is not served by this handler (it serves {', '.join(TASKS)}); "
                            "re-export with the matching `python -m export`") from None


__all__ = ["TASK_PARAMETERS", "TASKS", "PreparedImage", "ResponseOptions", "Task", "task_for"]
