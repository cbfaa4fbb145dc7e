"""fxlava's built-in passes, one module each, run in the order of ``DEFAULT_PASSES``.

Each is written only against fxlava's pass API (``fxlava.pass_manager``, ``fxlava.rewrite``,
``fxlava.errors``), so each is also an example of a user pass.
"""
from fxlava.pass_manager import Pass, Pipeline
from fxlava.passes.avgpool_to_sumpool import avgpool_to_sumpool
from fxlava.passes.bias_to_current import bias_to_current
from fxlava.passes.coscale_layers import coscale_layers
from fxlava.passes.fold_constant_scales import fold_constant_scales
from fxlava.passes.fold_batchnorm import fold_batchnorm
from fxlava.passes.fuse_blocks import fuse_blocks
from fxlava.passes.insert_layout import insert_layout
from fxlava.passes.lower_adaptive_pools import lower_adaptive_pools
from fxlava.passes.lower_module_subclasses import lower_module_subclasses
from fxlava.passes.lower_residuals import lower_residuals
from fxlava.passes.maxpool_to_or import maxpool_to_or
from fxlava.passes.reject_bias import reject_bias
from fxlava.passes.remove_identities import remove_identities
from fxlava.passes.resolve_conv_padding import resolve_conv_padding
from fxlava.passes.substitute_neurons import substitute_neurons

DEFAULT_PASSES = (
    Pass("lower_module_subclasses", lower_module_subclasses, lower_module_subclasses.check),
    Pass("remove_identities", remove_identities),
    Pass("fold_constant_scales", fold_constant_scales),
    Pass("reject_bias", reject_bias, reject_bias.check),
    Pass("fold_batchnorm", fold_batchnorm, fold_batchnorm.check),
    Pass("resolve_conv_padding", resolve_conv_padding, resolve_conv_padding.check),
    Pass("lower_adaptive_pools", lower_adaptive_pools, lower_adaptive_pools.check),
    Pass("avgpool_to_sumpool", avgpool_to_sumpool, avgpool_to_sumpool.check),
    Pass("substitute_neurons", substitute_neurons, substitute_neurons.check),
    Pass("maxpool_to_or", maxpool_to_or, maxpool_to_or.check),
    Pass("lower_residuals", lower_residuals, lower_residuals.check),
    Pass("fuse_blocks", fuse_blocks),
    Pass("coscale_layers", coscale_layers),
    Pass("insert_layout", insert_layout),
)


def default_pipeline() -> Pipeline:
    """A fresh copy of the built-in pipeline, to edit with insert_before/insert_after/replace/remove."""
    return Pipeline(DEFAULT_PASSES)


__all__ = ["DEFAULT_PASSES", "default_pipeline", "bias_to_current"]
