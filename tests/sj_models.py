"""SpikingJelly 2.0's own models (activation_based.model and .examples), built from the installed package.

torchvision cannot import beside the CPU torch here, and the examples import tensorboard, gym and the
like for their training scripts. ``stubs`` puts a module in place only for an import that fails, and
every name in it raises when used: the models below never touch them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch
from spikingjelly.activation_based import functional, neuron

STUBBED = ("torchvision", "torch.utils.tensorboard", "tensorboard", "tensorboardX", "gym", "torchaudio", "cv2")


def _unused(name):
    """A stand-in that raises when called or instantiated; a class, so that files may subclass it
    (spikingjelly.datasets subclasses torchvision's DatasetFolder)."""
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stub: the SpikingJelly file imports it, the model does not use it")
    return type(name.rsplit(".", 1)[-1], (), {"__init__": fail, "__module__": name.rsplit(".", 1)[0]})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.roots):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(attr, prefix=spec.name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _unused(f"{prefix}.{attr}")

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def stubs(roots=STUBBED):
    """Stub the modules among ``roots`` that cannot be imported, for the duration of the block."""
    missing = []
    for root in roots:
        try:
            importlib.import_module(root)
        except Exception:
            missing.append(root)
    finder = _StubFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if any(name == r or name.startswith(r + ".") for r in missing):
                del sys.modules[name]


def sj(module: str):
    """Import ``spikingjelly.activation_based.<module>`` with the stubs in place."""
    with stubs():
        return importlib.import_module(f"spikingjelly.activation_based.{module}")


def multi_step(model):
    functional.set_step_mode(model, "m")
    return model.eval()


def run_sj(model, x):
    """SpikingJelly's own forward of ``model`` on ``x``, from the resting state and leaving it there."""
    functional.reset_net(model)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        functional.reset_net(model)


def spikes(*shape, rate=0.4, seed=0):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def zero_bias_and_shifts(model):
    """Biases removed and BatchNorm shifts set to 0 by hand (the rest of the model as it was)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                if m.affine:
                    m.bias.zero_()
                if m.running_mean is not None:
                    m.running_mean.zero_()
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias = None
    return model


def lively(model, seed=0, step=1 / 16):
    """Weights on lava-dl's grid and large enough that every layer spikes on random inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:  # conv and linear weights
                fan_in = p[0].numel()
                k = max(1, round(40 / fan_in ** 0.5))
                p.copy_(torch.randint(-6 * k, 6 * k + 1, p.shape, generator=g) * step)
    return model


T, N = 4, 2


def _plif(cls, shape, **kw):
    def build():
        return multi_step(getattr(sj("model.parametric_lif_net"), cls)(channels=4, spiking_neuron=neuron.LIFNode,
                                                                       **kw))
    return build, lambda: spikes(T, N, *shape)


# name -> (build, example input, expected): expected is "compiles" or the refusal reasons, each a regex
# that the error must contain; "zeroed" says whether the model with biases/shifts zeroed must compile.
MODELS = {
    "model.parametric_lif_net.MNISTNet": (*_plif("MNISTNet", (1, 28, 28)), ["synapse with a bias"], True),
    "model.parametric_lif_net.FashionMNISTNet": (*_plif("FashionMNISTNet", (1, 28, 28)), ["synapse with a bias"],
                                                 True),
    "model.parametric_lif_net.NMNISTNet": (*_plif("NMNISTNet", (2, 34, 34)), ["synapse with a bias"], True),
    "model.parametric_lif_net.CIFAR10Net": (*_plif("CIFAR10Net", (3, 32, 32)), ["synapse with a bias"], True),
    "model.parametric_lif_net.CIFAR10DVSNet": (*_plif("CIFAR10DVSNet", (2, 128, 128)), ["synapse with a bias"],
                                               True),
    "model.parametric_lif_net.DVSGestureNet": (*_plif("DVSGestureNet", (2, 128, 128)), ["synapse with a bias"],
                                               True),
    "examples.lif_fc_mnist.SNN": (lambda: sj("examples.lif_fc_mnist").SNN(tau=2.0).eval(),
                                  lambda: spikes(T, N, 1, 28, 28), "compiles", True),
    "examples.conv_fashion_mnist.CSNN.conv_fc": (
        lambda: multi_step(sj("examples.conv_fashion_mnist").CSNN(T=T, channels=4)).conv_fc,
        lambda: spikes(T, N, 1, 28, 28), "compiles", True),
    "examples.conv_fashion_mnist.CSNN": (  # repeats a static image over time: its encoder runs on the host
        lambda: sj("examples.conv_fashion_mnist").CSNN(T=T, channels=4).eval(),
        lambda: torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(0)), "compiles", False),
    "examples.rsnn_sequential_fmnist.PlainNet": (lambda: multi_step(sj("examples.rsnn_sequential_fmnist").PlainNet()),
                                                 lambda: spikes(T, N, 28), ["synapse with a bias"], True),
    "examples.rsnn_sequential_fmnist.FeedBackNet": (
        lambda: multi_step(sj("examples.rsnn_sequential_fmnist").FeedBackNet()), lambda: spikes(T, N, 28),
        ["synapse with a bias", "recurrent container"], False),
    "model.spiking_resnet.spiking_resnet18": (
        lambda: multi_step(sj("model.spiking_resnet").spiking_resnet18(spiking_neuron=neuron.IFNode, num_classes=10)),
        lambda: spikes(1, 1, 3, 32, 32), "compiles", False),
    "model.sew_resnet.sew_resnet18": (
        lambda: multi_step(sj("model.sew_resnet").sew_resnet18(spiking_neuron=neuron.IFNode, num_classes=10,
                                                                cnf="ADD")),
        lambda: spikes(1, 1, 3, 32, 32), "compiles", False),
    "examples.memopt.models.CIFAR10DVSVGG": (
        lambda: sj("examples.memopt.models").CIFAR10DVSVGG().eval(),
        lambda: spikes(N, T, 2, 48, 48),  # [N, T, *]: its forward() transposes the input to [T, N, *]
        ["synapse with a bias"], True),
    # OTTTLIFNode's own default is a soft reset (v_reset=None); the model passes its kwargs to every neuron
    "model.spiking_vggws_ottt.ottt_spiking_vggws": (
        lambda: sj("model.spiking_vggws_ottt").ottt_spiking_vggws(num_classes=10).eval(),
        lambda: spikes(T, N, 3, 32, 32), ["synapse with a bias", "soft-reset neuron"], False),
    "model.spiking_vggws_ottt.ottt_spiking_vggws(v_reset=0.0)": (
        lambda: sj("model.spiking_vggws_ottt").ottt_spiking_vggws(num_classes=10, v_reset=0.0).eval(),
        lambda: spikes(T, N, 3, 32, 32), ["synapse with a bias"], True),
    "examples.spiking_lstm_sequential_mnist.Net": (
        lambda: sj("examples.spiking_lstm_sequential_mnist").Net().eval(), lambda: spikes(T, N, 28),
        [r"recurrent container \(SpikingLSTM.*hidden state h and cell state c", "synapse with a bias"], False),
    # its temporal attention is built for T steps and forward() checks it: an example of T = 60 (sizes made small)
    "model.masnn.MASNN": (
        lambda: sj("model.masnn").MASNN(T=60, channels=(4, 4, 4), input_size=(8, 8), fc_hidden=8,
                                        reduction_c=2).eval(),
        lambda: spikes(60, 1, 2, 8, 8),
        ["^attention: MultiDimensionalAttention", "^attention: TemporalWiseAttention", "synapse with a bias"], False),
    # [N, C, T, n_mel] (delta_order 0): its convs' kernels span 4 steps along T, which forward() then puts first
    "examples.speech_commands.Net": (
        lambda: sj("examples.speech_commands").Net().eval(), lambda: spikes(N, 1, 12, 40),
        [r"a convolution across time steps: axis 2 .* kernel spans 4 steps"], False),
    "model.spikformer.spikformer_cifar10": (
        lambda: multi_step(sj("model.spikformer").spikformer_cifar10(T=T)), lambda: spikes(T, N, 3, 32, 32),
        ["^attention: a product of two activations", "max pool of values that are not spikes"], False),
    "model.spiking_vgg.spiking_vgg11": (  # its head pools to 7 x 7: the 224 x 224 input it is built for, T = N = 1
        lambda: multi_step(sj("model.spiking_vgg").spiking_vgg11(spiking_neuron=neuron.IFNode, num_classes=10)),
        lambda: spikes(1, 1, 3, 224, 224), ["synapse with a bias"], False),
    "model.ms_resnet.ms_resnet18": (
        lambda: multi_step(sj("model.ms_resnet").ms_resnet18(num_classes=10)), lambda: spikes(2, 1, 3, 32, 32),
        ["residual connection"], False),
    "model.ms_resnet.max_resnet18": (
        lambda: multi_step(sj("model.ms_resnet").max_resnet18(num_classes=10)), lambda: spikes(2, 1, 3, 32, 32),
        ["residual connection", "max pool of values that are not spikes"], False),
    "model.masnn.att_ms_resnet18": (
        lambda: multi_step(sj("model.masnn").att_ms_resnet18(num_classes=10)), lambda: spikes(2, 1, 3, 32, 32),
        ["residual connection", "^attention: MultiDimensionalAttention"], False),
}

# refusals outside the five structural reasons that a row may have, each a limit of Loihi itself
EXTRA_REASONS = {
    # OTTTLIFNode's own default: Loihi resets the voltage to 0
    "model.spiking_vggws_ottt.ottt_spiking_vggws": [r"a soft-reset neuron \(v_reset=None\)"],
    # not a per-step feed-forward chain: each output step reads several input steps
    "examples.speech_commands.Net": [r"a convolution across time steps"],
    # its patch stem max-pools BatchNorm outputs (conv -> BN -> max pool -> LIF), which no OR of spikes computes
    # and its MLPs are Conv1d (kernel 1 over tokens) + BatchNorm1d, which fxlava does not lower (a netx conv is 2-d)
    "model.spikformer.spikformer_cifar10": [r"a max pool of values that are not spikes",
                                            r"a max pool that feeds a spiking neuron with no synapse",
                                            r"a module with no Loihi equivalent in fxlava",
                                            r"a BatchNorm not directly after a conv or linear synapse"],
    # MS-ResNet adds membrane potentials (BatchNorm outputs), not spikes: those adds are refused as residual
    # connections; its head, fc(x).mean(0), is taken as the readout (it would run on the host)
    "model.ms_resnet.ms_resnet18": [r"mean\(\) along the time or batch axis"],
    "model.ms_resnet.max_resnet18": [r"mean\(\) along the time or batch axis", r"a max pool of values that are not spikes",
                                     r"a max pool that feeds a spiking neuron with no synapse"],
}
