"""The launch template's user data run as cloud-init would run it on an instance, with /etc/skiff
redirected into a folder of the caller's and a `systemctl` that only records its calls (the
caller starts the agent itself, or checks what would have been started)."""

from __future__ import annotations

import base64
import os
import subprocess


def run_user_data(user_data_b64: str, workdir: str, env: dict | None = None,
                  prefix: tuple = ()) -> str:
    """Run the script in `workdir` (its files land in workdir/etc-skiff, systemctl's calls in
    workdir/systemctl.calls); `env` is added to the environment, `prefix` runs it inside another
    command (the fleet box: nsenter into the host's namespace). Returns agent.toml's path;
    raises RuntimeError with the script's error output when it fails."""
    script = base64.b64decode(user_data_b64).decode()
    if "/etc/skiff" not in script:
        raise ValueError("the user data writes nothing under /etc/skiff: is it skiff's launch template?")
    etc, bindir = os.path.join(workdir, "etc-skiff"), os.path.join(workdir, "bin")
    os.makedirs(bindir, exist_ok=True)
    calls = os.path.join(workdir, "systemctl.calls")
    with open(os.path.join(bindir, "systemctl"), "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >>{calls}\n')
    os.chmod(os.path.join(bindir, "systemctl"), 0o755)
    proc = subprocess.run([*prefix, "bash", "-c", script.replace("/etc/skiff", etc)],
                          env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", **(env or {})),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"user data failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return os.path.join(etc, "agent.toml")


def systemctl_calls(workdir: str) -> list[str]:
    """The systemctl calls the user data made, one string each ("enable --now skiff-agent")."""
    try:
        with open(os.path.join(workdir, "systemctl.calls")) as f:
            return [line.strip() for line in f]
    except FileNotFoundError:
        return []
