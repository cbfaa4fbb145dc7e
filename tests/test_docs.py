"""The Python blocks of docs/tutorial.md run as written, in order, in one namespace."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.lava
def test_tutorial_code_runs(tmp_path, monkeypatch):
    blocks = python_blocks(DOCS / "tutorial.md")
    assert len(blocks) >= 5, "the tutorial page lost its code blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "tutorial"}
    for code in blocks:
        exec(compile(code, str(DOCS / "tutorial.md"), "exec"), namespace)
    # the last block compared Lava with lava-dl and wrote the file where it said
    assert (tmp_path / "mnist_csnn.net").is_file()
    assert namespace["got"].shape == namespace["expected"].shape == (4, 10, 8)
