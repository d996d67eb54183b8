"""Kernels for the grader, forked from a process that has already imported torch.

Grading runs every notebook in a fresh kernel, so that nothing a learner did in one notebook can
change another's result. Started the ordinary way (`python -m ipykernel_launcher -f FILE`), each
kernel pays Python's start-up, ipykernel's imports and then torch's in the notebook's first cell:
about 2 s on two cores before any of the notebook runs, for every notebook.

`ForkedKernelManager` starts the same kernel from a fork server: a process, started once per
grading process, that imports torch and ipykernel and then only forks. The child becomes what
`python -m ipykernel_launcher -f FILE` would be (a session of its own, the notebook's folder as
working directory and first on sys.path, the kernel's environment and argv, a closed stdin) and
runs it. It is as fresh as a new one: the server runs no notebook code, and each kernel is used
for one notebook and killed. Only its modules differ: torch and ipykernel are imported already.
(The server's one other thread is numpy's OpenBLAS pool, which stops itself around a fork.)

The server stays the kernels' parent: it reaps a kernel only when asked whether it has exited, so
a pid the grader signals is never one the system has given to another process. It exits when the
grading process does (end of file on its requests).

Elsewhere than on Linux (macOS does not allow every library to be forked without exec), or for a
kernel spec other than this Python's ipykernel, the kernel is launched the ordinary way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

from jupyter_client import AsyncKernelManager


class ForkedKernelManager(AsyncKernelManager):
    """A KernelManager whose kernel of this Python's ipykernel is forked by the fork server."""

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw) -> None:
        if kernel_cmd[:3] != [sys.executable, "-m", "ipykernel_launcher"] or sys.platform != "linux":
            return await super()._async_launch_kernel(kernel_cmd, **kw)
        cwd = os.path.abspath(kw.get("cwd") or os.getcwd())
        env = dict(kw.get("env") or os.environ)
        server = _server()
        pid = server.ask(launch={"args": kernel_cmd[3:], "env": env, "cwd": cwd})["pid"]
        # LocalProvisioner drives a Popen: hand it one for the forked kernel, which leads its own group
        prov = self.provisioner
        prov.process, prov.pid, prov.pgid, prov.cwd = _Forked(pid, server), pid, pid, cwd
        self._reconcile_connection_info(prov.connection_info)


class _Forked:
    """What LocalProvisioner uses of a `subprocess.Popen`, for a kernel forked by the server."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, server: _Server):
        self.pid, self.server, self.returncode = pid, server, None

    def poll(self) -> int | None:
        if self.returncode is None:  # asked of the server that forked it: its parent
            self.returncode = self.server.ask(poll=self.pid)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None and (end is None or time.monotonic() < end):
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still this kernel's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class _Server:
    """The grading process's end of the fork server: one JSON line out, one back."""

    def __init__(self):
        replies, self._reply_w = os.pipe()
        # a session of its own: a ^C in the terminal reaches the grader (which then kills its kernel), not it
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(self._reply_w)], stdin=subprocess.PIPE,
                                     pass_fds=[self._reply_w], text=True, start_new_session=True)
        os.close(self._reply_w)
        self._replies = os.fdopen(replies, "r")
        self._lock = threading.Lock()  # jupyter_client may call from its own thread
        self.owner = os.getpid()

    def ask(self, **request) -> dict:
        with self._lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self._replies.readline()
        if not line:
            raise RuntimeError(f"the kernel fork server ended (exit code {self.proc.wait()})")
        return json.loads(line)


_SERVER: _Server | None = None


def _server() -> _Server:
    global _SERVER
    if _SERVER is None or _SERVER.owner != os.getpid() or _SERVER.proc.poll() is not None:  # first use, or gone
        _SERVER = _Server()
    return _SERVER


# --------------------------------------------------------------------------------------------
# The fork server (python -m minigemma.grading.forked_kernels REPLY_FD)
# --------------------------------------------------------------------------------------------
def serve(reply_fd: int) -> None:
    # What every kernel imports, once, here. ipykernel reads JPY_PARENT_PID on import: it is this
    # server's pid, the parent of every kernel (each kernel's environment says so too).
    os.environ["JPY_PARENT_PID"] = str(os.getpid())
    import ipykernel.kernelapp  # noqa: F401
    import torch  # noqa: F401

    # Python 3.12+ warns on fork in a process with threads: the one here is OpenBLAS's, which handles it
    warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning)

    replies = os.fdopen(reply_fd, "w", buffering=1)
    exited: dict[int, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "launch" in request:
            pid = os.fork()
            if pid == 0:
                replies.close()
                _become_kernel(**request["launch"])  # never returns
            answer = {"pid": pid}
        else:
            pid = request["poll"]
            if pid not in exited:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exited[pid] = os.waitstatus_to_exitcode(status)
            answer = {"returncode": exited.get(pid)}
        replies.write(json.dumps(answer) + "\n")


def _become_kernel(args: list[str], env: dict, cwd: str) -> None:
    """In the forked child: run `python -m ipykernel_launcher ARGS` as if started in `cwd` with `env`."""
    import atexit
    import runpy

    code = 1
    try:
        os.setsid()  # a session and process group of its own, as jupyter_client gives a kernel it launches
        r, w = os.pipe()  # stdin: not the server's requests, but a pipe already closed, as jupyter_client gives
        os.close(w)
        os.dup2(r, 0)
        os.close(r)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        os.environ["JPY_PARENT_PID"] = str(os.getppid())  # as jupyter_client sets it: the kernel ends with the server
        sys.path[0] = cwd  # as `python -m` has it (ipykernel_launcher then takes it out, as it does there)
        sys.argv = ["ipykernel_launcher", *args]
        runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1 if e.code else 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what an ordinary exit runs, then leave without returning into the server
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
