"""run_lava cannot hang and ends in no traceback from inside Lava: each failure names the file and the layer."""
import gc
import os
import signal
import time

import h5py
import numpy as np
import pytest

import fxlava
import fxlava.lava_runner as lava_runner
from tests.processes import LavaBar, forks_of_this_process
from tests.test_lava_toolchain import CONV_INPUT, T, conv_net, spikes, written


@pytest.fixture
def no_strays():
    before = forks_of_this_process()
    yield
    assert forks_of_this_process() - before == set(), "Lava processes were left running"


@pytest.mark.lava
def test_a_run_over_its_time_budget_is_stopped_and_named(tmp_path, monkeypatch, no_strays):
    class Hanging(LavaBar):
        on_update = staticmethod(lambda: time.sleep(3600))

    monkeypatch.setattr(lava_runner, "tqdm", Hanging)
    path = written(conv_net(), tmp_path, CONV_INPUT)
    start = time.monotonic()
    with pytest.raises(fxlava.LavaRunError, match=r"did not finish 2 samples of 16 steps within 8 s") as err:
        lava_runner.run_lava(path, spikes((2, *CONV_INPUT, T), seed=2), timeout=8)
    assert time.monotonic() - start < 30
    assert err.value.path == path


@pytest.mark.lava
def test_a_lava_worker_that_dies_is_named_with_its_layer(tmp_path, monkeypatch, no_strays):
    def kill_the_conv_synapse():
        # runs inside the process that runs Lava: find its network and the worker of the conv's synapse
        from lava.lib.dl.netx.hdf5 import Network

        # the running network's workers are this process's children: a Network of an earlier test (forked
        # into the child with everything else) may still list workers, closed or long gone
        for net in [o for o in gc.get_objects() if isinstance(o, Network)]:
            for worker, process in lava_runner._worker_processes(net):
                if getattr(worker, "_parent_pid", None) == os.getpid() and process is net.layers[0].synapse:
                    os.kill(worker.pid, signal.SIGKILL)

    class Killing(LavaBar):
        on_update = staticmethod(kill_the_conv_synapse)

    monkeypatch.setattr(lava_runner, "tqdm", Killing)
    path = written(conv_net(), tmp_path, CONV_INPUT)
    with pytest.raises(fxlava.LavaRunError, match=r"for netx layer 1 died while the network ran \(killed by signal 9\)") as err:
        lava_runner.run_lava(path, spikes((3, *CONV_INPUT, T), seed=2), timeout=120)
    assert err.value.layer == 1


@pytest.mark.lava
def test_an_all_zero_dense_layer_is_named_before_netx_crashes_on_it(tmp_path):
    path = written(conv_net(), tmp_path, CONV_INPUT)
    with h5py.File(path, "r+") as f:
        f["layer/3/weight"][...] = 0
    with pytest.raises(fxlava.LavaRunError, match=r"netx layer 3 \(dense\) has all 480 weights zero") as err:
        lava_runner.run_lava(path, spikes((1, *CONV_INPUT, T), seed=2))
    assert err.value.layer == 3


@pytest.mark.lava
def test_a_layer_netx_cannot_build_is_named(tmp_path):
    path = written(conv_net(), tmp_path, CONV_INPUT)
    with h5py.File(path, "r+") as f:
        del f["layer/1/type"]
        f["layer/1"].create_dataset("type", (1,), "S10", [b"pool"])
    with pytest.raises(fxlava.LavaRunError, match=r"netx could not load netx layer 1: NotImplementedError") as err:
        lava_runner.lava_latency(path)
    assert err.value.layer == 1


def test_a_missing_or_foreign_file_is_named(tmp_path):
    x = spikes((1, *CONV_INPUT, T), seed=2)
    with pytest.raises(fxlava.LavaRunError, match="no such netx file"):
        lava_runner.run_lava(tmp_path / "missing.net", x)
    (tmp_path / "text.net").write_text("not hdf5")
    with pytest.raises(fxlava.LavaRunError, match="not an hdf5 file"):
        lava_runner.run_lava(tmp_path / "text.net", x)


def test_the_time_budget_grows_with_the_network_and_keeps_its_floor(tmp_path):
    path = written(conv_net(), tmp_path, CONV_INPUT)
    small = lava_runner.time_budget(path, 1, T)
    assert small >= lava_runner.BUDGET_FLOOR_S
    assert lava_runner.time_budget(path, 10_000, T) > 2 * small
    assert np.isfinite(small)


@pytest.mark.lava
def test_a_lava_worker_that_raises_is_named_with_its_layer_and_error(tmp_path, monkeypatch, no_strays):
    # as Lava's int8 conv fields did at 256 groups: the conv's worker divides by zero
    from lava.proc.conv import utils

    def broken_conv(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(utils, "conv", broken_conv)  # Lava's workers are forked: they see it
    path = written(conv_net(), tmp_path, CONV_INPUT)
    with pytest.raises(fxlava.LavaRunError, match=r"PyConvModelFixed for netx layer 1 raised ZeroDivisionError: "
                                                  r"integer division or modulo by zero \(File .*test_lava_run_failures") as err:
        lava_runner.run_lava(path, spikes((2, *CONV_INPUT, T), seed=2), timeout=120)
    assert err.value.layer == 1
    assert "Traceback" not in str(err.value)
