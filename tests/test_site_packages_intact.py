"""fxlava.compat fixes Lava at import time only: the installed files must stay exactly as pip wrote them."""
import base64
import hashlib
import importlib
import importlib.metadata
import subprocess
import sys

import pytest

import fxlava.compat  # installs the import hook before any lava import
import lava.lib.dl.netx  # noqa: F401
import lava.lib.dl.slayer
import lava.magma.compiler.var_model  # noqa: F401  (patched for Python 3.11)
import lava.magma.core.process.ports.ports  # noqa: F401  (patched under numpy 2)
from lava.magma.core.run_configs import Loihi2SimCfg  # noqa: F401

# Every module the shim rewrites on this interpreter, so each patched load happens before the check.
for _module in fxlava.compat.active_patches():
    importlib.import_module(_module)

DISTRIBUTIONS = ("lava-nc", "lava-dl", "spikingjelly")


def _record_digest(data: bytes, mode: str) -> str:
    # RECORD stores urlsafe base64 without '=' padding (the wheel spec, PEP 376/427).
    return base64.urlsafe_b64encode(hashlib.new(mode, data).digest()).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_installed_files_match_their_record_hashes(name):
    dist = importlib.metadata.distribution(name)
    hashed = [f for f in dist.files if f.hash is not None]
    # A wheel records a hash for every file but RECORD itself and bytecode compiled at install
    # time; without this floor, a RECORD that lists nothing would pass.
    assert len(hashed) > 100, f"{name}: only {len(hashed)} hashed files in RECORD"
    changed, missing = [], []
    for f in hashed:
        location = f.locate()
        try:
            data = location.read_bytes()
        except FileNotFoundError:
            missing.append(str(f))
            continue
        if _record_digest(data, f.hash.mode) != f.hash.value:
            changed.append(str(f))
    assert not changed and not missing, f"{name}: changed {changed}, missing {missing}"


def test_patched_modules_were_rewritten_in_memory():
    # The hash check above only means something if the shim really rewrote these modules.
    patched = fxlava.compat.active_patches()
    assert "lava.magma.compiler.var_model" in patched or sys.version_info < (3, 11)
    for name in patched:
        assert type(sys.modules[name].__loader__).__name__ == "_PatchedSourceLoader", name


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_fxlava_makes_lava_importable_in_a_fresh_interpreter():
    result = _python(
        "import fxlava\n"
        "import lava.lib.dl.slayer, lava.lib.dl.netx, lava.magma.compiler.var_model\n"
        "print('imported')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="var_model imports unpatched before Python 3.11")
def test_without_fxlava_var_model_fails_on_this_python():
    # Shows the test above needs the shim: the genuine module is rejected by Python 3.11 dataclasses.
    result = _python("import lava.magma.compiler.var_model")
    assert result.returncode != 0
    assert "mutable default" in result.stderr


def test_object_detection_fails_with_a_clear_import_error_when_used():
    obd = lava.lib.dl.slayer.obd
    if not hasattr(obd, "__fxlava_unavailable__"):
        pytest.skip("cv2 and a matching torchvision are installed: object_detection imports for real")
    with pytest.raises(ImportError, match=r"lava\.lib\.dl\.slayer\.object_detection is unavailable .*fxlava does not use it"):
        obd.YOLOBase  # noqa: B018
    with pytest.raises(ImportError, match="cv2"):
        from lava.lib.dl.slayer.object_detection import dataset  # noqa: F401
