"""fxlava: compile SpikingJelly models to Lava-DL blocks and netx files for Loihi."""
from fxlava import compat as _compat

_compat.install()
