"""fxlava: compile SpikingJelly models to Lava-DL blocks and netx files for Loihi."""
import logging as _logging

from fxlava import compat as _compat

_compat.install()  # before anything imports lava (see fxlava/compat.py)


def _drop_triton_notice(record) -> bool:
    # SpikingJelly registers its neuron kernels with torch.library.triton_op; on a CPU-only torch
    # torch then warns "Triton not available" twice per process, which no user of fxlava can act on
    return "Triton not available" not in record.getMessage()


_logging.getLogger("torch._library.triton").addFilter(_drop_triton_notice)

from fxlava.errors import FxlavaError, Issue, LavaRunError, PassError, QuantizationWarning, UnsupportedModelError  # noqa: E402
from fxlava.layout import NXT_to_TNX, TNX_to_NXT  # noqa: E402
from fxlava.options import CompileOptions  # noqa: E402
from fxlava.pass_manager import CompileContext, Pass, PassResult, Pipeline  # noqa: E402
from fxlava.compiler import CompiledNetwork, compile  # noqa: E402
from fxlava.netx_executor import NetxFileError, NetxNetwork, load_netx  # noqa: E402


def default_pipeline() -> Pipeline:
    """A fresh copy of the built-in pass pipeline."""
    from fxlava.passes import default_pipeline as _default

    return _default()


def run_graph(gm, x):
    """Run a graph module at any point of the pipeline on [T, N, *] spikes; see fxlava.graph_runner."""
    from fxlava.graph_runner import run_graph as _run

    return _run(gm, x)


def run_lava(path, x, **kwargs):
    """Run a netx file in Lava's CPU simulator on [N, *, T] spikes; see fxlava.lava_runner.run_lava."""
    from fxlava.lava_runner import run_lava as _run

    return _run(path, x, **kwargs)


__all__ = [
    "compile", "CompiledNetwork", "CompileOptions", "default_pipeline", "run_graph", "run_lava", "load_netx",
    "NetxNetwork", "NetxFileError", "TNX_to_NXT", "NXT_to_TNX",
    "Pipeline", "Pass", "PassResult", "CompileContext",
    "FxlavaError", "UnsupportedModelError", "PassError", "LavaRunError", "QuantizationWarning", "Issue",
]
__version__ = "0.1.0"
