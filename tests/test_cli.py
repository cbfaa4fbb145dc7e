"""fxlava-compile through a subprocess, as a user runs it."""
import subprocess
import sys
import textwrap

import pytest

MODEL = textwrap.dedent('''
    import torch, torch.nn as nn
    from spikingjelly.activation_based import layer, neuron

    class Net(nn.Module):
        def __init__(self, bias=False):
            super().__init__()
            self.c = layer.Conv2d(1, 4, 3, bias=bias, step_mode="m"); self.s1 = neuron.IFNode(step_mode="m")
            self.f = layer.Linear(4 * 6 * 6, 5, bias=bias, step_mode="m"); self.s2 = neuron.IFNode(step_mode="m")
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                self.c.weight.copy_(torch.randint(-8, 24, self.c.weight.shape, generator=g) / 32)
                self.f.weight.copy_(torch.randint(-16, 12, self.f.weight.shape, generator=g) / 64)

        def forward(self, x):
            return self.s2(self.f(self.s1(self.c(x)).flatten(2)))

    class ImageNet(Net):
        """Takes static images [N, 1, 8, 8] and repeats them over time itself, as SpikingJelly's CSNN does."""

        def forward(self, x):
            return super().forward(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0)

    def biased():
        return Net(bias=True)

    def tag(gm, ctx):
        """A user pass that only records that it ran."""
        ctx.record("tag", "user pass ran")
''')


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fxlava.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "usermodel.py").write_text(MODEL)
    return tmp_path


def test_help(tmp_path):
    r = _run("--help", cwd=tmp_path)
    assert r.returncode == 0 and "--verify" in r.stdout and "--input-shape" in r.stdout


def test_print_pipeline_with_user_pass(model_dir):
    r = _run("--print-pipeline", "--pass", "usermodel.py:tag", "--after", "fuse_blocks", cwd=model_dir)
    assert r.returncode == 0, r.stderr
    names = [line.split()[1] for line in r.stdout.splitlines() if line.strip()]
    assert names[names.index("fuse_blocks") + 1] == "tag"


@pytest.mark.lava
def test_compile_and_verify_a_model_outside_the_repository(model_dir):
    r = _run("usermodel.py:Net", "--input-shape", "8,2,1,8,8", "-o", "out.net", "--verify", "2", cwd=model_dir)
    assert r.returncode == 0, r.stderr
    assert (model_dir / "out.net").is_file()
    assert "verify: 2/2 samples equal on every spike" in r.stdout
    assert "conv" in r.stdout and "dense" in r.stdout and "vThMant" in r.stdout


def test_biased_model_is_refused_cleanly(model_dir):
    r = _run("usermodel.py:biased", "--input-shape", "8,2,1,8,8", "-o", "bad.net", cwd=model_dir)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "- c (" in r.stderr and "- f (" in r.stderr and "bias=False" in r.stderr
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith("__")) == ["usermodel.py"]


def test_bad_model_spec(model_dir):
    r = _run("usermodel.py", "--input-shape", "8,2,1,8,8", "-o", "x.net", cwd=model_dir)
    assert r.returncode != 0 and "path/to/file.py:name" in r.stderr


@pytest.mark.lava
def test_biased_model_compiles_as_bias_currents_and_verifies(model_dir):
    r = _run("usermodel.py:biased", "--input-shape", "8,2,1,8,8", "-o", "b.net", "--bias", "current", "--verify", "2",
             cwd=model_dir)
    assert r.returncode == 0, r.stderr
    assert "bias_to_current" in r.stdout and "reject_bias" not in r.stdout
    assert "bias quantised (bias_mant)" in r.stdout
    assert "verify: 2/2 samples equal on every spike" in r.stdout


def test_unknown_bias_mode_is_refused(model_dir):
    r = _run("usermodel.py:biased", "--input-shape", "8,2,1,8,8", "-o", "b.net", "--bias", "silently", cwd=model_dir)
    assert r.returncode == 2 and "invalid choice: 'silently'" in r.stderr


NEWCOMER = textwrap.dedent('''
    import torch, torch.nn as nn
    from spikingjelly.activation_based import layer, neuron

    def untrained():
        """A first try: PyTorch's default init, no training."""
        torch.manual_seed(0)
        return nn.Sequential(
            layer.Conv2d(2, 8, 3, padding=1, bias=False, step_mode="m"), neuron.LIFNode(step_mode="m"),
            layer.AvgPool2d(2, step_mode="m"), layer.Flatten(step_mode="m"),
            layer.Linear(512, 10, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"))
''')


def test_an_untrained_model_whose_dense_layer_rounds_to_zero_is_refused_with_the_layer(tmp_path):
    # every weight of Linear(512, 10) under PyTorch's default init is below 1/64: without co-scaling all
    # round to zero, which compile refuses by name (netx cannot load an all-zero dense layer either)
    (tmp_path / "newcomer.py").write_text(NEWCOMER)
    r = _run("newcomer.py:untrained", "--input-shape", "8,2,2,16,16", "-o", "first.net", "--verify", "2",
             "--no-coscale", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "- 2 -> 4 -> 5 (fxlava.blocks.SynapseBlock)" in r.stderr, r.stderr  # pool 2 merged into Linear 4, IF 5
    assert "quantised weights are all zero" in r.stderr and "coscale=True" in r.stderr
    assert not (tmp_path / "first.net").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written file


@pytest.mark.lava
def test_the_untrained_first_try_compiles_and_verifies_with_co_scaling(tmp_path):
    # the same first try with the default options: co-scaling lifts the dense layer's weights onto the grid
    (tmp_path / "newcomer.py").write_text(NEWCOMER)
    r = _run("newcomer.py:untrained", "--input-shape", "8,2,2,16,16", "-o", "first.net", "--verify", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: 2/2 samples equal on every spike" in r.stdout
    assert (tmp_path / "first.net").exists()


@pytest.mark.lava
def test_verify_data_runs_a_dataset_through_the_executor_and_some_in_lava(model_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(model_dir / "data.npy", (rng.random((40, 1, 8, 8, 8)) < 0.3).astype(np.float32))  # [N, C, H, W, T]
    r = _run("usermodel.py:Net", "--input-shape", "8,2,1,8,8", "-o", "out.net", "--verify-data", "data.npy",
             "--verify", "2", "--batch", "16", cwd=model_dir)
    assert r.returncode == 0, r.stderr
    assert "verify-data: 40/40 samples of data.npy equal to lava-dl on every output spike" in r.stdout
    assert "verify-data: 2/2 of them in Lava equal to lava-dl" in r.stdout


@pytest.mark.lava
def test_a_model_that_takes_images_verifies_from_its_encoders_spikes(model_dir):
    import numpy as np

    np.save(model_dir / "images.npy", np.random.default_rng(0).random((24, 1, 8, 8)).astype(np.float32))
    r = _run("usermodel.py:ImageNet", "--input-shape", "2,1,8,8", "-o", "out.net", "--verify-data", "images.npy",
             "--verify", "2", cwd=model_dir)
    assert r.returncode == 0, r.stderr
    assert "encoder of the input, run on the host (net.encoder), up to s1: .unsqueeze(), .repeat(), c (Conv2d)" \
        in r.stdout
    assert "verify-data: 24/24 samples of images.npy equal to lava-dl on every output spike" in r.stdout
    assert "verify-data: 2/2 of them in Lava equal to lava-dl" in r.stdout


def test_verify_data_in_spikingjelly_layout_is_refused_with_a_hint(model_dir):
    import numpy as np

    np.save(model_dir / "data.npy", np.zeros((8, 5, 1, 8, 8), dtype=np.float32))  # [T, N, C, H, W]
    r = _run("usermodel.py:Net", "--input-shape", "8,2,1,8,8", "-o", "out.net", "--verify-data", "data.npy",
             cwd=model_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "expected [N, 1, 8, 8, T]" in r.stderr and "fxlava.TNX_to_NXT" in r.stderr


def _table(stdout):
    """The layer table's rows as {layer kind: {column: cell}} (columns split on two or more spaces)."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#  layer"))
    head = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        cells = re.split(r"\s{2,}", ln.strip())
        if len(cells) == len(head):
            rows[cells[1]] = dict(zip(head, cells))
    return rows


def test_table_reports_the_scale_and_no_coscale_turns_it_off(model_dir):
    on = _run("usermodel.py:Net", "--input-shape", "8,2,1,8,8", "-o", "on.net", cwd=model_dir)
    off = _run("usermodel.py:Net", "--input-shape", "8,2,1,8,8", "-o", "off.net", "--no-coscale", cwd=model_dir)
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    on, off = _table(on.stdout), _table(off.stdout)
    assert off["conv"]["scale"] == off["dense"]["scale"] == "1"
    assert off["conv"]["threshold (vThMant)"] == "1 (64)"
    # grid weights: integer factors, which keep them exact; IF ties: threshold mantissa 64 s - 1
    for kind in ("conv", "dense"):
        s = int(on[kind]["scale"])
        assert s >= 2 and on[kind]["threshold (vThMant)"].endswith(f"({64 * s - 1})")
        assert on[kind]["clipped"] == "0" and on[kind]["to zero"] == "0 (0%)"
