"""``save_mode: "onnx"``: a ``torch.onnx`` graph saved as ``model.onnx`` and run by ONNX Runtime.

The handlers load it through :func:`ts_handlers.artifacts.load_artifact` like ``model.pt`` and
``model.pt2``: :class:`ONNXModel` is callable like the eager model (torch tensors in, a torch
tensor out), so no task code knows which runtime answers. Serving needs ``onnxruntime`` only
(``pip install 'ts-handlers[onnx]'``); exporting and quantizing also need ``onnx`` and
``onnxscript`` and live in :mod:`ts_handlers.onnx_export` (``ONNXFormat``, which extends
:class:`ONNXArtifact`).

Our metadata travels inside the file, as an ONNX ``metadata_props`` entry named
``ts_handlers.json``: ONNX Runtime hands it back from ``get_modelmeta().custom_metadata_map``,
from Python and from its C/C++ API alike (docs/without-python.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ts_handlers.artifacts import METADATA_FILE, ArtifactFormat, ExportError
from ts_handlers.config import OnnxRuntimeConfig

if TYPE_CHECKING:
    import onnxruntime

INSTALL_HINT = "save_mode 'onnx' needs ONNX Runtime: pip install 'ts-handlers[onnx]'"
GRAPH_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(INSTALL_HINT) from None
    return onnxruntime


def session_options(settings: OnnxRuntimeConfig) -> onnxruntime.SessionOptions:
    """ONNX Runtime's session options from the archive's ``onnxruntime`` settings."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    level = GRAPH_OPTIMIZATION_LEVELS[settings.graph_optimization_level]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = settings.intra_op_num_threads
    options.inter_op_num_threads = settings.inter_op_num_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
    )
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if settings.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    return options


def providers_for(device: torch.device) -> list[Any]:
    """The execution provider for ``device``; a device ONNX Runtime cannot use is refused."""
    ort = import_onnxruntime()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    raise ExportError(
        f"this ONNX Runtime ({ort.__version__}) has no execution provider for {device}; install "
        "onnxruntime-gpu for CUDA, or serve on the CPU"
    )


class ONNXModel(torch.nn.Module):
    """An ONNX Runtime session, callable like the eager model it was exported from.

    Inputs are fed by position, in the graph's input order; the first output is returned, as
    a CPU torch tensor sharing ONNX Runtime's buffer (no copy).
    """

    def __init__(self, session: onnxruntime.InferenceSession, model_bytes: bytes | None = None):
        super().__init__()
        self.session = session
        self.input_names = [value.name for value in session.get_inputs()]
        self.output_names = [session.get_outputs()[0].name]
        # The serialized graph, kept by the export so that save() writes what was verified.
        self.model_bytes = model_bytes

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise RuntimeError(
                f"the ONNX graph takes {len(self.input_names)} inputs "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        feed = {
            name: tensor.detach().cpu().contiguous().numpy()
            for name, tensor in zip(self.input_names, inputs, strict=True)
        }
        return torch.from_numpy(self.session.run(self.output_names, feed)[0])


def session_from_bytes(
    model_bytes: bytes,
    settings: OnnxRuntimeConfig | None = None,
    device: torch.device | None = None,
) -> onnxruntime.InferenceSession:
    ort = import_onnxruntime()
    return ort.InferenceSession(
        model_bytes,
        session_options(settings or OnnxRuntimeConfig()),
        providers=providers_for(device or torch.device("cpu")),
    )


class ONNXArtifact(ArtifactFormat):
    """The load side of ``save_mode: "onnx"``: ``model.onnx`` in an ONNX Runtime session, with
    the archive's ``onnxruntime`` settings (its export side is ``onnx_export.ONNXFormat``)."""

    name = "onnx"
    file_name = "model.onnx"

    def __init__(self, settings: OnnxRuntimeConfig | None = None) -> None:
        self.settings = settings or OnnxRuntimeConfig()

    def configure(self, config: Any) -> None:
        self.settings = config.onnxruntime

    def load(self, path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
        ort = import_onnxruntime()
        session = ort.InferenceSession(
            str(path), session_options(self.settings), providers=providers_for(device)
        )
        metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_FILE) or "{}"
        model = ONNXModel(session).eval()
        return model, {**json.loads(metadata), "runtime": runtime_description(session)}


def runtime_description(session: onnxruntime.InferenceSession) -> dict[str, Any]:
    """What the describe answer says runs the model: ONNX Runtime's version and settings."""
    ort = import_onnxruntime()
    options = session.get_session_options()
    return {
        "name": "onnxruntime",
        "version": ort.__version__,
        "providers": session.get_providers(),
        "graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
        "intra_op_num_threads": options.intra_op_num_threads,
        "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning")
        == "1",
    }
