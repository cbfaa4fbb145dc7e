"""Example models and scripts shipped with fxlava."""
