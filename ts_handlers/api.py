"""Everything a handler of your own needs, in one import.

::

    import ts_handlers.api as ts

    class MyConfig(ts.HandlerConfig):
        mode: str = "my_task"

    class MyHandler(ts.TaskHandler[MyConfig]):
        def decode(self, request: ts.Request) -> ts.Decoded: ...

    handle = ts.entry_point(MyHandler)

The base stacks the inputs, moves them to the device and runs the model under
``torch.inference_mode()`` (``TaskHandler.forward``), and writes each output as a JSON list
(``TaskHandler.encode``) unless the task overrides them. See docs/adding-a-task.md.
"""

from typing import TYPE_CHECKING, Any

from ts_handlers.admission import Budget
from ts_handlers.base import Decoded, Route, TaskHandler, entry_point
from ts_handlers.config import (
    HandlerConfig,
    OptionBool,
    OptionInt,
    PositiveInt,
    RequestOptions,
)
from ts_handlers.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RequestError,
    TooManyRequests,
    UnsupportedMediaType,
)
from ts_handlers.payload import Request
from ts_handlers.protocols import OutputTensor, Parsed, TaskSpec, WireProtocol
from ts_handlers.tasks import Task

if TYPE_CHECKING:
    from ts_handlers.export import ExportPlan

__all__ = [
    "Budget",
    "Decoded",
    "ExportPlan",
    "HandlerConfig",
    "InvalidInput",
    "NotFound",
    "OptionBool",
    "OptionInt",
    "OutputTensor",
    "Parsed",
    "PayloadTooLarge",
    "PositiveInt",
    "Request",
    "RequestError",
    "RequestOptions",
    "Route",
    "Task",
    "TaskHandler",
    "TaskSpec",
    "TooManyRequests",
    "UnsupportedMediaType",
    "WireProtocol",
    "entry_point",
]


def __getattr__(name: str) -> Any:
    # ExportPlan is export-time: imported when a task's export asks for it, so that a worker
    # serving a handler of your own (which imports this module) loads no export code.
    if name == "ExportPlan":
        from ts_handlers.export import ExportPlan

        return ExportPlan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
