"""Processes a test leaves behind, read from /proc.

Lava's workers are forks of this interpreter. When the process that started them is killed they
are re-parented, so they are found by what a fork keeps: the same command line and working
directory as this process.
"""
import os


def _stat(pid: str):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def forks_of_this_process() -> set[int]:
    """Live (non-zombie) processes, other than this one, with this process's command line and directory."""
    me = os.getpid()
    with open(f"/proc/{me}/cmdline", "rb") as f:
        cmdline = f.read()
    cwd = os.getcwd()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != cmdline or os.readlink(f"/proc/{entry}/cwd") != cwd:
                    continue
        except OSError:
            continue
        stat = _stat(entry)
        if stat is not None and stat[0] != "Z":
            found.add(int(entry))
    return found


class LavaBar:
    """Stands in for tqdm inside the process that runs Lava; ``on_update`` runs after each sample."""

    on_update = staticmethod(lambda: None)

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        type(self).on_update()
