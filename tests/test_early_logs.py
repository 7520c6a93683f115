"""launcher/early_logs.py: library records from before a process's logs are set up, and the known noise among
them (what a rank does with them: tests/test_console.py)."""
import subprocess
import sys

from launcher import ROOT, early_logs


def test_known_noise_is_recognised_by_source_and_words():
    import logging

    noise = early_logs.KnownNoise()

    def record(name, msg):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    assert not noise.filter(record("DeepSpeed", "Setting accelerator to CPU. If you have GPU ..."))
    assert not noise.filter(record("bitsandbytes.backends.cpu.ops",
                                   "Failed to load CPU gemm_4bit_forward from kernels-community: no module"))
    assert noise.filter(record("transformers.trainer", "Setting accelerator to CPU"))  # the same words elsewhere
    assert noise.filter(record("DeepSpeed", "ZeRO-3 found a parameter it does not know"))
    assert not noise.filter(record("py.warnings", "/x/methods.py:167: FutureWarning: `use_liger_kernel=True` is "
                                                  "deprecated and will be removed in v2.0.0. Use the Hub kernels"))


def test_the_preflight_process_shows_library_warnings_but_not_known_noise():
    script = ("from launcher import early_logs\n"
              "early_logs.to_stderr_without_known_noise()\n"
              "import logging\n"
              "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
              "'Failed to load CPU gemm_4bit_forward from kernels-community: x')\n"
              "logging.getLogger('datasets').warning('a warning worth reading')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "datasets: WARNING: a warning worth reading\n"
