"""hardware.py: the CPU allocator setting the trainer applies, and how nanogpt-bench reports MFU."""

import sys

import pytest
from conftest import run_cli

from nanogpt_hf.bench import _mfu_text


@pytest.mark.slow
def test_cpu_allocator_setting_stops_per_step_page_faults():
    """The trainer's glibc setting (hardware.keep_freed_memory_mapped): a 64 MB block allocated and freed 20 times,
    as a training step does with an embedding gradient, is not page-faulted in afresh each time. Measured in
    fresh processes, with and without the setting."""
    code = (
        "import resource, sys, torch\n"
        "from nanogpt_hf.hardware import keep_freed_memory_mapped\n"
        "if sys.argv[1] == 'tuned':\n"
        "    assert keep_freed_memory_mapped()\n"
        "for _ in range(3):  # the heap settles over the first few blocks\n"
        "    torch.empty(16 << 20).fill_(1.0)\n"
        "faults = []\n"
        "for _ in range(20):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at once\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(sorted(faults)[10])  # the median round: the kernel may reclaim idle pages now and then\n"
    )
    faults = {}
    for mode in ("default", "tuned"):
        proc = run_cli([sys.executable, "-c", code, mode])
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = float(proc.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["tuned"] < 100, faults  # 16,384 pages of 4 KiB in 64 MB


def test_an_impossible_mfu_is_reported_as_an_unreliable_peak():
    assert _mfu_text(0.412).strip() == "41.2% MFU"
    assert "unreliable" in _mfu_text(1.85) and "%" not in _mfu_text(1.85)
