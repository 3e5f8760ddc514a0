"""A fork()ed child of a process that ran the C++ kernel on several threads can call it again.

GNU OpenMP's thread pool does not survive fork(): a child entering a parallel region of more than
one thread waits forever for the parent's threads (in our kernel and in torch's own parallel ops,
which share libgomp). duat_kernels.cpp registers an os.register_at_fork handler that makes the
child run on one thread. The check runs in a subprocess with a timeout, so that a hang fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from duat_kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension not built: {cpp.IMPORT_ERROR}")

CHILD_TIMEOUT_S = 60

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import sys

    import torch

    import duat_kernels as dk

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 4, 24, 24, generator=g).softmax(-1)
    w_v, w_o = torch.randn(16, 48, generator=g), torch.randn(48, 16, generator=g)
    parent = dk.hvo_matrix(attn, w_v, w_o, backend="cpp")  # starts the OpenMP pool on 2 threads


    def child(queue):
        w = dk.hvo_matrix(attn, w_v, w_o, backend="cpp")
        big = torch.rand(512, 512) @ torch.rand(512, 512)  # torch's own parallel ops too
        queue.put((torch.equal(w, parent), torch.get_num_threads(), bool(big.isfinite().all())))


    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start()
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
            print("child hung", flush=True)
            sys.exit(3)
        equal, threads, finite = queue.get(timeout=5)
        print(f"equal={equal} threads={threads} finite={finite}", flush=True)
        sys.exit(0 if equal and finite and proc.exitcode == 0 else 4)
""").replace("TIMEOUT", str(CHILD_TIMEOUT_S - 15))


def test_forked_child_can_call_the_kernel(tmp_path):
    script = tmp_path / "fork_child.py"
    script.write_text(SCRIPT)
    try:
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fork test did not finish in {CHILD_TIMEOUT_S} s")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "equal=True threads=1 finite=True" in run.stdout
