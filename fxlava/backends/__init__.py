"""Backends: turn a compiled network into artefacts other tools load (lava-dl blocks, netx hdf5 files)."""
