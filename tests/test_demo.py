"""make demo's job, on the shipped trained weights: held-out digits recognised, Lava equal to lava-dl."""
import pytest

from fxlava.examples import demo


@pytest.mark.lava
def test_demo_recognises_digits_and_lava_equals_lava_dl(tmp_path):
    result = demo.demo(tmp_path, digits=2)
    labels = result["labels"]
    assert len(labels) == 20 and sorted(set(labels.tolist())) == list(range(10))
    assert not result["mismatch"].any(), "Lava differs from lava-dl"
    for title, y in result["outputs"].items():
        right = int((y.sum(0).argmax(-1) == labels).sum())
        # the shipped weights were trained (chance is 2/20); these digits are held out from training
        assert right >= 16, f"{title}: only {right}/20 held-out digits right"
    assert (tmp_path / "mnist_csnn.net").is_file() and (tmp_path / "rasters.png").stat().st_size > 10_000
