"""A compose mesh as one command: `up` finds what the host needs (accel.compose_probe),
writes the VIP override, starts the project and waits for the agent's readiness; `status`
tells the containers' state and the agent's; `down` stops the project, then removes the
agent's kept datapath (it runs with --keep) and the files `up` generated.

What `up` chose (extra files, variables, the agent's pin dir) is recorded in
<run dir>/compose/<project>.json beside the generated override, so `down` and `status`
act on what is running rather than on what the environment says now."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from accel import compose_probe

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
DEFAULT_API_SOCKET = "/run/accel/agent.sock"
RESTARTS_GIVE_UP = 3  # an agent container restarted this often since `up` is crash-looping

Say = Callable[[str], None]


class ComposeError(RuntimeError):
    """What failed; `code` 2 for bad arguments or files, 1 for the rest."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Record:
    """What `up` did for one project."""

    project: str
    files: list[str]                     # the user's compose files
    extra: list[str]                     # files `up` added (agent-caps, VIP override)
    env: dict[str, str]                  # variables `up` set for docker-compose
    agent: str                           # the compose service running `accel agent`
    pin_dir: str
    api_socket: str
    notes: list[str] = field(default_factory=list)


# ---- names and places -----------------------------------------------------------------------


def state_dir() -> Path:
    from accel.datapath.datapath import RUN_DIR

    return RUN_DIR / "compose"


def record_path(project: str) -> Path:
    return state_dir() / f"{project}.json"


def override_path(project: str) -> Path:
    return state_dir() / f"{project}.vips.yml"


def project_name(files: list[Path], given: str | None) -> str:
    """docker-compose (v1)'s: -p, else $COMPOSE_PROJECT_NAME, else the first file's directory
    name; lower case, letters, digits, - and _ only."""
    name = given or os.environ.get("COMPOSE_PROJECT_NAME") or files[0].resolve().parent.name
    norm = re.sub(r"[^-_a-z0-9]", "", name.lower())
    if not norm:
        raise ComposeError(f"project name {name!r} has no letters or digits", code=2)
    return norm


def check_files(files: list[str]) -> list[Path]:
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise ComposeError(f"no such compose file: {p}", code=2)
    return paths


# ---- the agent in a compose file or a container ----------------------------------------------


def _argv(command: Any) -> list[str]:
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command or []]


def is_agent(argv: list[str]) -> bool:
    """`accel agent ...` (possibly behind a path or an init)."""
    return any(os.path.basename(a) == "accel" and argv[i + 1:i + 2] == ["agent"]
               for i, a in enumerate(argv))


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def agent_flags(argv: list[str]) -> tuple[str, str]:
    """(pin dir, API socket) of an `accel agent` command line, defaults filled in."""
    from accel.kernel.loader import DEFAULT_PIN_DIR

    return (_flag(argv, "--pin-dir") or DEFAULT_PIN_DIR,
            _flag(argv, "--api-socket") or DEFAULT_API_SOCKET)


def agent_service(config: dict) -> tuple[str, dict]:
    found = [(name, svc) for name, svc in (config.get("services") or {}).items()
             if is_agent(_argv((svc or {}).get("entrypoint")) + _argv((svc or {}).get("command")))]
    if not found:
        raise ComposeError("no service in these files runs `accel agent`", code=2)
    if len(found) > 1:
        raise ComposeError(f"several services run `accel agent` ({', '.join(n for n, _ in found)})"
                           ": one agent per host", code=2)
    return found[0]


# ---- docker and docker-compose ----------------------------------------------------------------


def _compose_cmd() -> list[str]:
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def compose(project: str, files: list[Path | str], *args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [*_compose_cmd(), "-p", project]
    for f in files:
        cmd += ["-f", str(f)]
    try:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise ComposeError("docker-compose is not installed (deploy/setup.sh --docker)") from None
    except subprocess.TimeoutExpired:
        raise ComposeError(f"`{' '.join(cmd + list(args))}` did not finish in "
                           f"{timeout:g}s") from None


def _tail(text: str, n: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ComposeError("docker is not installed (deploy/setup.sh --docker)") from None
    except subprocess.TimeoutExpired:
        raise ComposeError(f"`docker {' '.join(args)}` did not finish in {timeout:g}s") from None


def containers(project: str) -> list[dict]:
    """`docker inspect` of every container of the project (by its compose label)."""
    r = docker("ps", "-a", "-q", "--filter", f"label={PROJECT_LABEL}={project}")
    if r.returncode:
        raise ComposeError(f"docker ps failed: {_tail(r.stderr, 3)}")
    ids = r.stdout.split()
    if not ids:
        return []
    r = docker("inspect", *ids)
    if r.returncode:  # one went away meanwhile: ask again for the rest
        return [c for i in ids if (c := _inspect(i))]
    return sorted(json.loads(r.stdout), key=lambda c: c["Name"])


def _inspect(cid: str) -> dict | None:
    r = docker("inspect", cid)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None


def networks(project: str) -> list[str]:
    r = docker("network", "ls", "-q", "--filter", f"label={PROJECT_LABEL}={project}")
    return r.stdout.split() if r.returncode == 0 else []


def container_argv(c: dict) -> list[str]:
    cfg = c.get("Config") or {}
    return _argv(cfg.get("Entrypoint")) + _argv(cfg.get("Cmd"))


def agent_container(project: str) -> dict | None:
    agents = [c for c in containers(project) if is_agent(container_argv(c))]
    return agents[0] if agents else None


def logs(c: dict, n: int = 6) -> str:
    r = docker("logs", "--tail", str(n), c["Id"])
    return _tail(r.stdout + r.stderr, n)


def host_path(c: dict, path: str) -> str | None:
    """Where a path inside container `c` is on the host, if a bind mount covers it."""
    for m in sorted(c.get("Mounts") or [], key=lambda m: -len(m.get("Destination", ""))):
        dest = m.get("Destination", "").rstrip("/")
        if m.get("Source") and (path == dest or path.startswith(dest + "/")):
            return m["Source"].rstrip("/") + path[len(dest):]
    return None


def agent_status(c: dict, api_socket: str, wait: float | None = None) -> tuple[dict | None, str]:
    """(status, "") from the agent's API, (None, why) if it does not answer or, with `wait`,
    is not ready within `wait` seconds. Asked from here through the mounted socket (as
    `accel status --wait`), else with `docker exec` in its container."""
    from accel.api import client

    sock = host_path(c, api_socket)
    if sock is not None:
        try:
            if wait is not None:
                return client.wait_ready(sock, wait), ""
            return client.get_status(sock), ""
        except (client.AgentUnavailable, client.ApiCallError) as e:
            return None, str(e)
    args = ["exec", c["Id"], "accel", "status", "--json", "--api-socket", api_socket]
    if wait is not None:
        args += ["--wait", f"{wait:g}"]
    try:
        r = docker(*args, timeout=(wait or 0) + 15)
    except ComposeError as e:  # an exec into a container that died meanwhile can hang
        return None, str(e)
    if r.returncode == 0:
        try:
            return json.loads(r.stdout), ""
        except ValueError:
            return None, f"unreadable status: {_tail(r.stdout, 2)}"
    why = _tail(r.stderr, 1) or f"exit status {r.returncode}"
    return None, why.removeprefix("accel: ")


def _running(c: dict) -> bool:
    st = c.get("State") or {}
    return bool(st.get("Running")) and not st.get("Restarting")


def _state(c: dict) -> str:
    st = c.get("State") or {}
    if st.get("Restarting"):
        return "restarting"
    return str(st.get("Status") or "?")


# ---- up ---------------------------------------------------------------------------------------


def _record_write(rec: Record) -> None:
    p = record_path(rec.project)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    p.write_text(json.dumps(asdict(rec), indent=2) + "\n")


def _record_read(project: str) -> Record | None:
    try:
        return Record(**json.loads(record_path(project).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def up(files: list[str], project: str | None, wait: float, say: Say) -> Record:
    from accel.compose_hosts import render_override
    from accel.model import ValidationError

    paths = check_files(files)
    name = project_name(paths, project)
    env: dict[str, str] = {}
    extra: list[Path] = []

    if os.environ.get("ACCEL_CGROUP2"):
        try:
            compose_probe.check_cgroup2(os.environ["ACCEL_CGROUP2"])
        except compose_probe.ProbeError as e:
            raise ComposeError(f"ACCEL_CGROUP2: {e} (unset it: `up` finds the mount)",
                               code=2) from None
        say(f"cgroup2: ACCEL_CGROUP2={os.environ['ACCEL_CGROUP2']} (from the environment)")
    else:
        try:
            env["ACCEL_CGROUP2"] = compose_probe.cgroup2()
        except compose_probe.ProbeError as e:
            raise ComposeError(str(e)) from None
        say(f"cgroup2 is mounted at {env['ACCEL_CGROUP2']}: ACCEL_CGROUP2={env['ACCEL_CGROUP2']}")

    r = compose(name, paths, "config", env=env, timeout=60)
    if r.returncode:
        raise ComposeError(f"docker-compose rejects these files:\n{_tail(r.stderr)}", code=2)
    config = yaml.safe_load(r.stdout) or {}
    agent, svc = agent_service(config)
    pin_dir, api_socket = agent_flags(_argv(svc.get("entrypoint")) + _argv(svc.get("command")))

    if svc.get("privileged"):
        image = svc.get("image")
        if not image:
            raise ComposeError(f"service {agent} has no image to probe privileged mode with",
                               code=2)
        try:
            probe = compose_probe.privileged(image)
            if probe.ok:
                say(f"docker starts privileged containers here: {agent} runs privileged")
            else:
                caps = compose_probe.caps_file(paths)
                extra.append(caps)
                say(f"docker cannot start privileged containers here ({probe.why}): "
                    f"added -f {caps} ({agent} gets the capabilities it uses instead)")
        except compose_probe.ProbeError as e:
            raise ComposeError(str(e)) from None
    else:
        say(f"{agent} is not privileged in these files: privileged mode not probed")

    try:
        text = render_override(paths)
    except ValidationError as e:
        raise ComposeError(f"invalid input: {e}", code=2) from None
    vips = override_path(name)
    vips.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    vips.write_text(text)
    extra.append(vips)
    say(f"name -> VIP override (accel compose hosts): -f {vips}")

    rec = Record(name, [str(p.resolve()) for p in paths], [str(p) for p in extra], env, agent,
                 pin_dir, api_socket)
    _record_write(rec)  # before `up`: a failed one is still taken down by `down`
    all_files = [*paths, *extra]
    say(f"{' '.join(_compose_cmd())} -p {name} {' '.join(f'-f {f}' for f in all_files)} up -d")
    r = compose(name, all_files, "up", "-d", env=env)
    if r.returncode:
        raise ComposeError(f"docker-compose up failed:\n{_tail(r.stderr)}")
    if wait > 0:
        st = wait_agent(name, api_socket, wait)
        say(f"agent ready ({st.get('services', 0)} services from {st.get('source', '?')}; "
            f"pin dir {st.get('pin_dir', pin_dir)}, cgroup {st.get('cgroup', '?')})")
    return rec


def wait_agent(project: str, api_socket: str, timeout: float) -> dict:
    """The agent's status once it is ready; ComposeError when `timeout` passes first or its
    container keeps restarting (with the end of its log)."""
    deadline = time.monotonic() + timeout
    why = "no agent container yet"
    c = None
    while True:
        c = agent_container(project) or c
        if c is not None:
            st = c.get("State") or {}
            if _running(c):
                left = max(1.0, min(2.0, deadline - time.monotonic()))
                status, why = agent_status(c, api_socket, wait=left)
                if status is not None:
                    return status
            else:
                why = f"agent container {_state(c)} (exit code {st.get('ExitCode')})"
            if c.get("RestartCount", 0) >= RESTARTS_GIVE_UP:
                raise ComposeError(f"the agent keeps restarting ({c['RestartCount']} restarts): "
                                   f"{why}; its log ends:\n{logs(c)}")
        if time.monotonic() >= deadline:
            tail = f"; its log ends:\n{logs(c)}" if c is not None else ""
            raise ComposeError(f"the agent is not ready after {timeout:g}s: {why}{tail}")
        time.sleep(0.5)


# ---- status -----------------------------------------------------------------------------------


def status(project: str) -> dict[str, Any]:
    """Containers (name, service, state, health, restarts) and the agent's readiness."""
    cs = containers(project)
    rows = [{"name": c["Name"].lstrip("/"),
             "service": (c.get("Config") or {}).get("Labels", {}).get(SERVICE_LABEL, ""),
             "state": _state(c),
             "health": ((c.get("State") or {}).get("Health") or {}).get("Status", ""),
             "restarts": c.get("RestartCount", 0)} for c in cs]
    agent: dict[str, Any] = {"container": None, "ready": False}
    ac = next((c for c in cs if is_agent(container_argv(c))), None)
    if ac is None:
        agent["error"] = "no agent container"
    else:
        agent["container"] = ac["Name"].lstrip("/")
        _, sock = agent_flags(container_argv(ac))
        if _running(ac):
            st, why = agent_status(ac, sock)
            if st is not None:
                agent.update(ready=bool(st.get("ready")), status=st)
                if not st.get("ready"):
                    agent["error"] = st.get("not_ready") or "not ready"
            else:
                agent["error"] = why
        else:
            agent["error"] = f"container {_state(ac)}"
    ok = bool(rows) and all(r["state"] == "running" for r in rows) and agent["ready"]
    return {"project": project, "ok": ok, "containers": rows, "agent": agent}


# ---- down -------------------------------------------------------------------------------------


def down(files: list[str], project: str | None, say: Say) -> dict[str, Any]:
    """docker-compose down, then the agent's kept datapath and the generated files removed.
    The pin dir is the one the agent container was started with (else the one `up`
    recorded): with neither, no datapath is touched. Safe to run again."""
    from accel.datapath.datapath import AlreadyRunning, uninstall

    paths = check_files(files)
    name = project_name(paths, project)
    rec = _record_read(name)
    ac = agent_container(name)
    pin_dir = agent_flags(container_argv(ac))[0] if ac else rec.pin_dir if rec else None
    extra = [Path(f) for f in (rec.extra if rec else []) if Path(f).is_file()]
    env = dict(rec.env) if rec else {}
    if "ACCEL_CGROUP2" not in env and not os.environ.get("ACCEL_CGROUP2"):
        try:  # only for docker-compose to read the files as `up` did
            env["ACCEL_CGROUP2"] = compose_probe.cgroup2()
        except compose_probe.ProbeError:
            pass
    all_files = [*paths, *extra]
    say(f"{' '.join(_compose_cmd())} -p {name} {' '.join(f'-f {f}' for f in all_files)} "
        "down --remove-orphans")
    r = compose(name, all_files, "down", "--remove-orphans", "-t", "15", env=env)
    if r.returncode:
        raise ComposeError(f"docker-compose down failed:\n{_tail(r.stderr)}")
    left = [c["Name"].lstrip("/") for c in containers(name)]
    if left:
        raise ComposeError(f"containers of {name} are still there: {', '.join(left)}")
    done: dict[str, Any] = {"project": name, "pin_dir": pin_dir, "detached": 0,
                            "pins_removed": False, "removed_files": []}
    if pin_dir:
        try:
            u = uninstall(pin_dir)
        except AlreadyRunning as e:
            raise ComposeError(f"{e} (the project's agent is down: another agent uses "
                               f"{pin_dir})") from None
        done.update(detached=len(u.detached), pins_removed=u.had_pins)
        say(f"removed the agent's kept datapath ({pin_dir}): {len(u.detached)} cgroup programs "
            f"detached{', ' + ', '.join(u.interfaces) + ' removed' if u.interfaces else ''}, "
            f"pins {'removed' if u.had_pins else 'absent'}")
    else:
        say(f"no agent container or `accel compose up` record for {name}: no datapath removed "
            "(`accel uninstall --pin-dir DIR` removes one)")
    generated = [p for p in (override_path(name), record_path(name)) if p.exists()]
    for p in generated:
        p.unlink(missing_ok=True)
        done["removed_files"].append(str(p))
    if generated:
        say(f"removed {', '.join(str(p) for p in generated)}")
    return done
