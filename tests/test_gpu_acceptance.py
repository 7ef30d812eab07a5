"""bench/gpu_acceptance.py where a CPU can check it: its one line without a GPU, and its
verdict on given figures (the lines themselves run on the day a GPU is lent; `--rehearse` runs
them all small on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))  # after tests/: both have a corpus.py

from gpu_verdict import Line, ceilings, verdict  # noqa: E402

CHECK = {"matches": True, "cosine min": 0.9995, "same errors": True, "truncated caught": True}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would measure")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, str(BENCH / "gpu_acceptance.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == "gpu_acceptance: no CUDA GPU on this machine; nothing measured\n"


def lines(cpu: float, gpu: float) -> list[Line]:
    return [Line("imgfeat --decode cpu", 4000, cpu, "cpu"),
            Line("imgfeat --decode gpu", 5000, gpu, "nvjpeg"),
            Line("model-only ceiling", None, 12000),
            Line("decode-only ceiling: CPU cores", None, 5000),
            Line("decode-only ceiling: nvJPEG", None, 9000)]


def test_each_line_is_held_to_min_of_model_and_its_decoding():
    limits = ceilings(lines(4800, 8600))
    assert limits["cpu"] == 5000 and limits["nvjpeg"] == 9000 and limits["both"] == 12000
    assert limits["vit"] is None  # not measured


def test_the_verdict_passes_at_the_target_and_says_whether_to_switch_auto():
    text, ok = verdict(lines(4800, 8600), CHECK, (True, "8 passed"), rehearse=False)
    assert ok and "0.96 of its ceiling (target 0.9): met" in text
    assert "--decode auto may include the GPU: YES (8,600/s against 4,800/s)" in text
    assert "goal, 10,000 images/s on one GPU: not met (best imgfeat line 8,600/s)" in text
    text, ok = verdict(lines(4000, 3000), CHECK, (True, "8 passed"), rehearse=False)
    assert not ok and "0.80 of its ceiling (target 0.9): NOT met" in text
    assert "may include the GPU: no: not faster" in text
    _, ok = verdict(lines(4800, 8600), {**CHECK, "matches": False, "cosine min": 0.99},
                    (True, "8 passed"), rehearse=False)
    assert not ok
    failed = lines(4800, 8600) + [Line("imgfeat --compile --decode cpu", note="failed: x",
                                       failed=True)]
    text, ok = verdict(failed, CHECK, (True, "8 passed"), rehearse=False)
    assert not ok and "lines that failed: imgfeat --compile --decode cpu" in text
