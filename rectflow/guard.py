"""Nothing a run starts outlives it: a command run in its own session, killed with its parent.

``python -m rectflow.guard --parent PID -- CMD ...`` starts a new session (its process group holds
CMD and everything CMD starts: DVC, the stage, torchrun's ranks, a Prefect server), runs CMD, and
exits with CMD's status. Twice a second it checks that ``PID`` (the run that started it) is alive;
when it is not (a ``kill -9`` of the run leaves no chance to clean up), it terminates the whole
group (SIGTERM, then SIGKILL after a grace period) and itself. SIGTERM, SIGINT and SIGHUP sent to the
guard are passed on to the group. :func:`guarded` builds the command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["guarded", "main"]

GRACE_S = 3.0
POLL_S = 0.5


def guarded(cmd: list[str], parent: int | None = None) -> list[str]:
    """``cmd`` run under the guard, tied to ``parent`` (default: this process)."""
    return [sys.executable, "-m", "rectflow.guard", "--parent", str(parent or os.getpid()), "--", *cmd]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group(sig: int = signal.SIGTERM) -> None:
    """Signal every process of this session but the guard, then SIGKILL what is left after the grace."""
    pgid = os.getpgid(0)
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(pgid, sig)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
        os.killpg(pgid, signal.SIGKILL)  # the guard too: nothing of the group remains
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--parent" or args[2] != "--" or not args[1].isdigit():
        print("usage: python -m rectflow.guard --parent PID -- CMD ...", file=sys.stderr)
        return 2
    parent, cmd = int(args[1]), args[3:]
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    child = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        try:
            return child.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            if not _alive(parent) or os.getppid() != parent:
                _end_group()
                return 137


if __name__ == "__main__":
    sys.exit(main())
