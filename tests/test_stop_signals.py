"""A stop signal costs at most the step in progress, under every launcher users have: SIGTERM to `accelerate launch`
during a step or an evaluation longer than its 5 s grace, or twice 0.3 s apart; the launcher as PID 1 (a container's
entrypoint); the detached checkpoint writer (no descendant of the worker, one thread, no GPU descriptors, a killed
writer one line); the line that says when a launcher's grace cannot fit a stop. Real trainer processes under the
real launchers; long steps and evaluations are a fault point's sleep (NANOGPT_DELAY_AT), which the signal cuts."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, alive, read_log, run_train, same_weights, start_train, train_losses, wait_for_iter

pytestmark = pytest.mark.slow

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              os.path.join(ROOT, "accelerate_configs", "cpu.yaml")]
RUN = ["--max_iters=40", "--eval_interval=10", "--always_save_checkpoint=true", "--dropout=0.1", "--keep_last=1"]


def _complete_checkpoints(out, within=120):
    """The complete checkpoints' iterations once no process of the run is left (waits up to `within` s for a
    detached writer to finish)."""
    assert not alive(out, within), "a process of the run is still alive"
    folder = out / "checkpoints"
    return sorted(int(c.split("-")[1]) for c in os.listdir(folder)
                  if c.startswith("ckpt-") and os.path.exists(folder / c / "MANIFEST.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data):
    """The same run uninterrupted: a resumed run must end with its weights and losses, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_train(out, char_data, *RUN)
    return out


def _resumes_to_the_reference(out, data, reference, iteration):
    resumed = run_train(out, data, *RUN, "--init_from=auto")
    assert f"Resuming training from {out}/checkpoints/ckpt-{iteration:07d}" in resumed.stdout
    assert train_losses(out) == train_losses(reference)
    assert same_weights(out, reference)


@pytest.mark.parametrize("signals", [1, 2])  # once; twice 0.3 s apart (the launcher then kills its tree at once)
def test_sigterm_to_accelerate_launch_during_a_step_longer_than_its_grace(tmp_path, char_data, reference, signals):
    """Step 12 takes 60 s. SIGTERM to the launcher during it: the step is abandoned at once, the checkpoint of the
    11 completed steps is written by a writer that neither the launcher's kill 5 s later nor at a second SIGTERM
    reaches (its manifest 8 s late, like a slow disk: slower than the grace), and the run resumes from it bit for
    bit."""
    out = tmp_path / "out"
    proc = start_train(out, char_data, *RUN, launcher=ACCELERATE, env={"NANOGPT_DELAY_AT": "step@12:60,checkpoint_manifest:8"})
    wait_for_iter(out, 10, proc)
    time.sleep(1.0)  # inside step 12's sleep
    os.kill(proc.pid, signal.SIGTERM)
    if signals == 2:
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    reached = max(r["iter"] for r in read_log(out) if "train/loss" in r)
    assert reached == 10
    assert _complete_checkpoints(out)[-1] == 11, stdout[-2000:] + stderr[-2000:]
    assert not [c for c in os.listdir(out / "checkpoints") if c.startswith(".tmp")]
    _resumes_to_the_reference(out, char_data, reference, 11)


def test_sigterm_to_accelerate_launch_during_an_evaluation_longer_than_its_grace(tmp_path, char_data, reference):
    """The evaluation at iteration 20 takes 60 s (its train split, the 5th evaluated split). SIGTERM to the launcher
    during it: the evaluation is dropped, the 20 completed steps are checkpointed, and no line claims a save that
    did not happen; the run resumes from it bit for bit."""
    out = tmp_path / "out"
    proc = start_train(out, char_data, *RUN, launcher=ACCELERATE, env={"NANOGPT_DELAY_AT": "eval@5:60"})
    wait_for_iter(out, 19, proc)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert _complete_checkpoints(out)[-1] == 20
    assert stdout.strip().splitlines()[-1].startswith("stopped by SIGTERM at iteration 20: checkpoint written")
    assert not any(r.get("iter") == 20 and "val/loss" in r for r in read_log(out))  # nothing of it kept
    _resumes_to_the_reference(out, char_data, reference, 20)


def test_a_killed_writer_is_one_line_naming_what_is_on_disk(tmp_path, char_data):
    """The OOM killer ends the detached writer (SIGKILL where the weights are written, before the manifest): one
    line names the newest complete checkpoint; the partial one is never resumed from. Step 27 takes 60 s, so the
    signal reaches the run inside it however fast the machine steps (without it, a fast CPU reached iteration 30's
    save, the third, before the signal arrived)."""
    out = tmp_path / "out"
    proc = start_train(out, char_data, *RUN, launcher=ACCELERATE,  # checkpoints of iterations 10, 20, then the stop's
                       env={"NANOGPT_KILL_AT": "checkpoint@3", "NANOGPT_DELAY_AT": "step@27:60"})
    wait_for_iter(out, 25, proc)
    time.sleep(1.0)  # inside step 27's sleep
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 143 and "Traceback" not in stderr and len(errors) == 1, stdout[-2000:] + stderr[-3000:]
    assert "the checkpoint writer (pid " in errors[0] and "was killed before it finished" in errors[0]
    assert f"the newest complete checkpoint is {out}/checkpoints/ckpt-0000020" in errors[0]
    assert _complete_checkpoints(out) == [20]
    assert [c for c in os.listdir(out / "checkpoints") if c.startswith(".tmp")] == [".tmp-ckpt-0000026"]  # the killed one's
    resumed = run_train(out, char_data, *RUN, "--init_from=auto")
    assert f"Resuming training from {out}/checkpoints/ckpt-0000020" in resumed.stdout


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_the_launcher_as_pid_1_trains_and_saves(tmp_path, char_data, launcher):
    """A container's entrypoint is PID 1 (`docker run IMAGE torchrun ...`, a pod without init): its workers' parent
    is PID 1 from the start, which is no sign that their launcher died. In a PID namespace of its own (unshare), the
    run trains to its end and saves, as without it."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for this test: apt-get install util-linux")
    out = tmp_path / "out"
    command = (ACCELERATE if launcher == "accelerate" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])
    namespace = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        namespace.insert(1, "--map-root-user")
    env = {"ACCELERATE_USE_CPU": "1"} if launcher == "torchrun" else {}
    proc = run_train(out, char_data, "--max_iters=20", "--eval_interval=10", launcher=[*namespace, *command], env=env,
                     check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world size 2" in proc.stdout if launcher == "torchrun" else "world size 1" in proc.stdout
    assert _complete_checkpoints(out)[-1] == 20


def test_a_launcher_whose_grace_cannot_fit_a_step_says_so(tmp_path, char_data):
    """Two processes under torchrun agree on a stop at the end of a step; torchrun's agent waits
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT after passing the signal on. When a step takes longer, one line says so at that
    moment, with the remedy; a stop within the grace still checkpoints the step it was on."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = start_train(out, char_data, "--max_iters=12", "--eval_interval=100", launcher=torchrun,
                  env={"ACCELERATE_USE_CPU": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2", "NANOGPT_DELAY_AT": "step@8:3"})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if "waits after a stop signal" in line]
    assert len(lines) == 1, stdout[-3000:]
    assert re.search(r"a step takes \d+\.\d s, more than the 2 s torch's elastic agent waits", lines[0]), lines[0]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=<seconds>" in lines[0]
    quiet = run_train(tmp_path / "quiet", char_data, "--max_iters=12", launcher=ACCELERATE)
    assert "waits after a stop signal" not in quiet.stdout  # one process: nothing a grace must fit


WRITER = textwrap.dedent("""
    import json, os, sys, tempfile, torch
    from nanogpt_hf import launch
    devices = tempfile.mkdtemp()  # stands in for /dev/nvidia*: the writer closes what is open there
    launch.GPU_DEVICES = (devices,)
    held = os.open(os.path.join(devices, "nvidia0"), os.O_CREAT | os.O_RDWR)
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    for _ in range(20):
        a @ a  # the OpenMP pool in use, as a training step leaves it
    report = sys.argv[1]

    def write():
        big = torch.ones(1 << 24)
        total = float(big.sum())  # a parallel op: with the parent's pool forked, it would wait forever
        targets = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}")]
        still_open = any(t.startswith(devices) for t in targets)
        json.dump({"pid": os.getpid(), "parent": os.getppid(), "sid": os.getsid(0), "threads": torch.get_num_threads(),
                   "sum": total, "device_open": still_open}, open(report, "w"))

    launch.outliving_the_launcher(write)
    print(os.getpid())
""")


def test_the_detached_writer_is_no_descendant_has_one_thread_no_gpu_descriptors_and_cannot_hang(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", WRITER, str(report)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker = int(proc.stdout.split()[-1])
    writer = json.load(open(report))
    assert writer["sum"] == float(1 << 24) and writer["threads"] == 1 and not writer["device_open"]
    # not the worker's child (its parent exited at once: the writer is init's or a subreaper's), in a session of its own
    assert writer["parent"] != worker and writer["sid"] != os.getsid(0)
