"""`make compose-test`: the compose deployment built and run for real on this machine.

Docker Hub, ghcr.io and the PyTorch wheel index cannot be reached here, so their parts are
made locally and handed to the real files through their own parameters, never by editing
them: a Debian bookworm root filesystem with Python 3.11 (mmdebstrap) is imported as the
Python base (api.Dockerfile's PYTHON_IMAGE); PostgreSQL and Redis images are built on it
from Debian's packages (docker/ci/*.Dockerfile, named in docker-compose.ci.yml); the CPU
worker is worker.Dockerfile on that base (CUDA_IMAGE) with uv from PyPI (UV_IMAGE); torch
and torchvision come from a wheel index served from this machine (TORCH_INDEX_URL) holding
the versions the project's virtualenv has. The builds use the host network, so they reach
that index on 127.0.0.1 and PyPI as the host does.

Then the stack runs from docker-compose.yml (cpu profile) and is driven from the host with
the `swav` command line: a key from `swav-service create-key` in the api container, a
generated image folder uploaded, a cpu-tiny job followed to success, a checkpoint
downloaded, an image embedded; a second job whose worker container is restarted while it
trains and which resumes and succeeds; the stack taken down (volumes kept) and brought
back with the jobs, checkpoints and key still there; the service containers running as uid
10001. Each phase prints its time; any failure exits non-zero; the stack is removed (with
its volumes) at the end. Build times are appended to var/compose-test/timings.jsonl.

    make compose-test        # docker/ci/engine.sh first: Docker, Compose, dockerd
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "docker" / "ci"
STATE = ROOT / "var" / "compose-test"
BIN = Path(sys.executable).parent
SWAV = str(BIN / "swav")

PROJECT = "swav-service-ci"
TAG = "ci"  # SWAV_IMAGE_TAG: the compose file's swav-service-api:ci and swav-service-worker:ci
PYTHON_BASE = "swav-ci/python:3.11-bookworm"
CUDA_STANDIN = "swav-ci/cuda-standin:3.11-bookworm"
POSTGRES_IMAGE = "swav-ci/postgres:bookworm"  # docker-compose.ci.yml names these two
REDIS_IMAGE = "swav-ci/redis:bookworm"
UV_REQUIREMENT = "uv>=0.9,<0.10"  # worker.Dockerfile's UV_IMAGE is ghcr.io/astral-sh/uv:0.9
UV_IMAGE = "swav-ci/uv:0.9"
# Fixed, because the index URL is a build argument of the torch layer: another port would
# be another cache key, and a second run would install torch again.
INDEX_PORT = int(os.environ.get("SWAV_CI_INDEX_PORT", "38741"))
DEBIAN_MIRROR = os.environ.get("SWAV_CI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY = os.environ.get(
    "SWAV_CI_DEBIAN_SECURITY", "http://deb.debian.org/debian-security"
)
BASE_PACKAGES = [  # what python:3.11-slim-bookworm offers the Dockerfiles
    "python3.11", "python3.11-venv", "python-is-python3", "ca-certificates", "passwd",
    "netbase", "tzdata",
]
SERVICE_UID = "10001"
READY_TIMEOUT_S = 240


# --- output and processes ----------------------------------------------------------------


class Failure(Exception):
    """A check that did not hold; the message says which and what was seen."""


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    say(f"\n=== {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        timings[name] = round(elapsed, 1)
        say(f"=== {name}: {elapsed:.1f} s")


def run(
    *args: str, capture: bool = False, env: dict[str, str] | None = None,
    cwd: Path = ROOT, check: bool = True, timeout: float = 3600, quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command, its stdout shown or captured, its stderr shown (progress bars,
    errors); a non-zero exit is a Failure."""
    if not quiet:
        say("$ " + " ".join(args))
    done = subprocess.run(
        args, cwd=cwd, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE if capture else None,
    )
    if check and done.returncode != 0:
        detail = f"\n{done.stdout}" if capture else ""
        raise Failure(f"exit {done.returncode}: {' '.join(args)}{detail}")
    return done


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def docker_build(dockerfile: Path, context: Path, tag: str, args: dict[str, str]) -> None:
    """The classic builder: BuildKit would fetch the `# syntax=` frontend from Docker Hub.
    On the host network, so RUN steps reach the local wheel index and PyPI."""
    command = ["docker", "build", "--network", "host", "-f", str(dockerfile), "-t", tag]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    run(*command, str(context), env={"DOCKER_BUILDKIT": "0"})


# --- images the CI cannot pull -----------------------------------------------------------


def make_python_base() -> None:
    """Debian bookworm minbase with Python 3.11, imported as the Python base image; kept
    across runs (a new import would be a new base and void every cached layer above it).
    It trusts the host's own CAs, so its containers reach PyPI as the host does."""
    if image_exists(PYTHON_BASE):
        say(f"{PYTHON_BASE} exists")
        return
    local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    hooks = []
    if local_cas:
        paths = " ".join(str(p) for p in local_cas)
        hooks += [f"--customize-hook=copy-in {paths} /usr/local/share/ca-certificates/",
                  '--customize-hook=chroot "$1" update-ca-certificates']
    hooks.append('--customize-hook=rm -rf "$1"/var/lib/apt/lists/*')
    with tempfile.TemporaryDirectory() as work:
        rootfs = Path(work) / "rootfs.tar"
        run("mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
            *hooks, "bookworm", str(rootfs),
            f"deb {DEBIAN_MIRROR} bookworm main",
            f"deb {DEBIAN_MIRROR} bookworm-updates main",
            f"deb {DEBIAN_SECURITY} bookworm-security main")
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        run("docker", "import",
            "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "ENV LANG=C.UTF-8",
            "--change", f"ENV PIP_CERT={bundle} SSL_CERT_FILE={bundle}",
            "--change", 'CMD ["python3"]',
            str(rootfs), PYTHON_BASE)


def make_uv_image() -> None:
    """PyPI's uv wheel of worker.Dockerfile's minor version, its two binaries at /."""
    downloads = STATE / "uv"
    downloads.mkdir(parents=True, exist_ok=True)
    run("pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
        "-d", str(downloads), UV_REQUIREMENT)
    wheel = sorted(downloads.glob("uv-*.whl"))[-1]
    context = STATE / "uv-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith(("/scripts/uv", "/scripts/uvx")):
                target = context / Path(member).name
                target.write_bytes(archive.read(member))
                target.chmod(0o755)
    docker_build(CI / "uv.Dockerfile", context, UV_IMAGE, {})


def make_stand_in_images() -> None:
    make_python_base()
    for name, tag in (("postgres", POSTGRES_IMAGE), ("redis", REDIS_IMAGE),
                      ("cuda-standin", CUDA_STANDIN)):
        docker_build(CI / f"{name}.Dockerfile", CI, tag, {"BASE_IMAGE": PYTHON_BASE})
    make_uv_image()


# --- the torch wheel index ---------------------------------------------------------------


def torch_requirements() -> list[str]:
    """torch and torchvision at the versions this virtualenv has (what `make setup` put
    there), so the images train with the same builds as the tests."""
    return [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]


def build_wheel_index() -> Path:
    """A PEP 503 tree, simple/<project>/<wheel>, of torch, torchvision and every wheel
    they need, fetched the way this machine's pip is configured (its local wheel folders,
    then PyPI). pip download keeps what it already has, so a second run copies nothing."""
    wheels = STATE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    run("pip", "download", "--quiet", "--only-binary", ":all:", "-d", str(wheels),
        *torch_requirements())
    index = STATE / "index" / "simple"
    shutil.rmtree(index, ignore_errors=True)
    for wheel in wheels.glob("*.whl"):
        project = wheel.name.split("-")[0].lower().replace("_", "-").replace(".", "-")
        (index / project).mkdir(parents=True, exist_ok=True)
        os.link(wheel, index / project / wheel.name)
    return index


@contextmanager
def serve_index(index: Path) -> Iterator[str]:
    """The index over HTTP on 127.0.0.1 (directory listings are simple-index pages)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", INDEX_PORT)) == 0:
            raise Failure(f"port {INDEX_PORT} is taken; set SWAV_CI_INDEX_PORT")
    log = open(STATE / "index-server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(INDEX_PORT),
         "--directory", str(index.parent)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", INDEX_PORT)) != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                raise Failure("the wheel index server did not start; see index-server.log")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{INDEX_PORT}/simple"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def build_service_images(index_url: str, timings: dict[str, float]) -> None:
    """The two real Dockerfiles, each build timed."""
    for name, dockerfile, args in (
        ("api", "api.Dockerfile", {"PYTHON_IMAGE": PYTHON_BASE}),
        ("worker", "worker.Dockerfile", {"CUDA_IMAGE": CUDA_STANDIN, "UV_IMAGE": UV_IMAGE}),
    ):
        start = time.monotonic()
        docker_build(ROOT / "docker" / dockerfile, ROOT, f"swav-service-{name}:{TAG}",
                     {**args, "TORCH_INDEX_URL": index_url})
        timings[f"build {name} image"] = round(time.monotonic() - start, 1)
        say(f"--- {name} image built in {timings[f'build {name} image']:.1f} s")


# --- the stack -----------------------------------------------------------------------------


class Stack:
    """docker-compose.yml with the CI override, as project swav-service-ci."""

    def __init__(self, api_port: int) -> None:
        self.env_file = STATE / "ci.env"
        self.env_file.write_text(
            f"POSTGRES_PASSWORD=ci-{os.urandom(8).hex()}\n"
            f"REDIS_PASSWORD=ci-{os.urandom(8).hex()}\n"
            f"SWAV_IMAGE_TAG={TAG}\n"
            f"SWAV_API_ADDRESS=127.0.0.1:{api_port}\n"
        )
        self.url = f"http://127.0.0.1:{api_port}"

    def compose(self, *args: str, capture: bool = False, check: bool = True,
                quiet: bool = False) -> subprocess.CompletedProcess[str]:
        return run("docker", "compose", "-p", PROJECT, "--env-file", str(self.env_file),
                   "-f", str(ROOT / "docker-compose.yml"),
                   "-f", str(CI / "docker-compose.ci.yml"),
                   "--profile", "cpu", *args, capture=capture, check=check, quiet=quiet)

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", "--scale", "worker-gpu=0")
        self.wait_ready()

    def states(self) -> dict[str, dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json", capture=True, quiet=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return {row["Service"]: row for row in rows}

    def wait_ready(self) -> None:
        """postgres, redis and api healthy, migrate exited 0, the workers running."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        healthy, running = ("running", "healthy"), ("running", "")
        wanted = {"postgres": healthy, "redis": healthy, "api": healthy,
                  "migrate": ("exited", ""), "worker-short": running, "worker-cpu": running}
        while True:
            states = self.states()
            seen = {name: (row.get("State"), row.get("Health", "")) for name, row in states.items()}
            migrate = states.get("migrate", {})
            if migrate.get("State") == "exited" and migrate.get("ExitCode") not in (0, None):
                raise Failure(f"migrate exited {migrate.get('ExitCode')}")
            if all(seen.get(name) == state for name, state in wanted.items()):
                say("ready: " + ", ".join(f"{name} {' '.join(seen[name]).strip()}"
                                          for name in sorted(wanted)))
                return
            if time.monotonic() > deadline:
                self.compose("ps", "--all")
                self.compose("logs", "--tail", "40")
                raise Failure(f"the stack was not ready within {READY_TIMEOUT_S} s")
            time.sleep(2)


# --- the service, driven with the `swav` command line -----------------------------------


class Swav:
    def __init__(self, url: str, key: str) -> None:
        self.env = {"SWAV_URL": url, "SWAV_API_KEY": key}

    def __call__(self, *args: str, quiet: bool = False) -> str:
        return run(SWAV, *args, env=self.env, capture=True, quiet=quiet).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self("--json", *args))

    def follow(self, *args: str) -> subprocess.Popen[str]:
        say("$ swav " + " ".join(args) + "  (in the background)")
        return subprocess.Popen([SWAV, *args], env={**os.environ, **self.env}, text=True)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        out = self("--json", "jobs", "logs", job_id, quiet=True)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def create_key(stack: Stack) -> str:
    out = stack.compose("exec", "-T", "api", "swav-service", "create-key", "--tenant", "ci",
                        capture=True).stdout
    key = out.strip().splitlines()[-1]
    if not key.startswith("swav_"):
        raise Failure(f"create-key printed no key: {out!r}")
    return key


def run_first_job(swav: Swav, images: Path, out: Path) -> dict[str, Any]:
    """Upload, a cpu-tiny job followed to success, a checkpoint downloaded, an embedding."""
    from PIL import Image

    dataset = swav.json("datasets", "upload", str(images), "--name", "ci-shapes")
    if dataset["status"] != "ready":
        raise Failure(f"dataset not ready: {dataset}")
    say(f"dataset {dataset['id']}: {dataset.get('num_images')} images")
    job = swav.json("jobs", "submit", "--dataset", dataset["id"], "--preset", "cpu-tiny",
                    "--follow")
    if job["status"] != "succeeded":
        raise Failure(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    checkpoints = swav.json("checkpoints", "list", job["id"])["data"]
    final = next(c for c in checkpoints if c["final"])
    saved = swav.json("checkpoints", "download", final["id"], "--format", "backbone",
                      "--out", str(out))
    say(f"checkpoint {final['id']} (step {final['step']}) saved as {saved['path']}")
    image = next(images.rglob("*.png"))
    swav("embed", "--model", job["id"], str(image), "--out", str(out / "embedding.npy"))
    import numpy as np

    vectors = np.load(out / "embedding.npy")
    if vectors.shape[0] != 1 or not np.isfinite(vectors).all():
        raise Failure(f"embedding of {image.name}: {vectors.shape}")
    with Image.open(image) as picture:
        say(f"embedded {image.name} {picture.size}: a {vectors.shape[1]}-vector")
    return {"dataset": dataset, "job": job, "checkpoints": checkpoints}


def restart_worker_mid_job(stack: Stack, swav: Swav, dataset_id: str) -> dict[str, Any]:
    """A longer job; once it has saved a checkpoint the worker container is restarted;
    the job must be requeued, resume from that checkpoint and succeed."""
    job = swav.json("jobs", "submit", "--dataset", dataset_id, "--preset", "cpu-tiny",
                    "--set", "epochs=40", "--name", "restarted")
    follower = swav.follow("jobs", "logs", job["id"], "--follow")
    deadline = time.monotonic() + 300
    while not any(e["type"] == "checkpoint" for e in swav.events(job["id"])):
        if time.monotonic() > deadline or follower.poll() is not None:
            raise Failure(f"job {job['id']} saved no checkpoint to restart from")
        time.sleep(1)
    before = swav.json("jobs", "show", job["id"])
    say(f"restarting worker-cpu at step {before['progress']['step']}"
        f"/{before['progress']['total_steps']}")
    stack.compose("restart", "worker-cpu")
    if follower.wait(timeout=900) != 0:
        raise Failure(f"job {job['id']} did not succeed after the restart")
    events = swav.events(job["id"])
    kinds = [e["type"] for e in events]
    requeued = [e["data"] for e in events if e["type"] == "requeued"]
    resumed = [e["data"] for e in events if e["type"] == "resumed"]
    say(f"requeued: {requeued}; resumed: {resumed}")
    if not resumed or resumed[0]["step"] <= 0:
        raise Failure(f"job {job['id']} never resumed from a checkpoint: {kinds}")
    job = swav.json("jobs", "show", job["id"])
    if job["status"] != "succeeded" or job["progress"]["step"] != job["progress"]["total_steps"]:
        raise Failure(f"job {job['id']} after the restart: {job['status']} {job['progress']}")
    return job


def check_persistence(stack: Stack, swav: Swav, jobs: list[dict[str, Any]], out: Path) -> None:
    """Down (volumes kept) and up: the key, the jobs and their checkpoint files are there."""
    stack.compose("down")
    stack.up()
    for job in jobs:
        again = swav.json("jobs", "show", job["id"])  # the key too: a 401 would fail here
        if again["status"] != "succeeded":
            raise Failure(f"job {job['id']} after down/up: {again['status']}")
        checkpoints = swav.json("checkpoints", "list", job["id"])["data"]
        if not checkpoints:
            raise Failure(f"job {job['id']} lost its checkpoints")
        one = checkpoints[-1]
        folder = out / "after-restart"
        folder.mkdir(exist_ok=True)
        swav.json("checkpoints", "download", one["id"], "--out", str(folder))
        say(f"job {job['id']}: succeeded, {len(checkpoints)} checkpoints, {one['id']} downloads")


def check_users(stack: Stack) -> None:
    for service in ("api", "worker-cpu", "worker-short"):
        uid = stack.compose("exec", "-T", service, "id", "-u", capture=True).stdout.strip()
        main_uid = stack.compose("exec", "-T", service, "stat", "-c", "%u", "/proc/1",
                                 capture=True).stdout.strip()
        say(f"{service}: exec as uid {uid}, PID 1 as uid {main_uid}")
        if uid != SERVICE_UID or main_uid != SERVICE_UID:
            raise Failure(f"{service} runs as uid {uid}/{main_uid}, not {SERVICE_UID}")


# --- main ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    from swav_core.synthetic import write_shapes_dataset

    STATE.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()
    stack = Stack(free_port())
    stack_up = False
    try:
        with phase("stand-in images (Python base, PostgreSQL, Redis, uv)", timings):
            make_stand_in_images()
        with phase("torch wheel index", timings):
            index = build_wheel_index()
        with phase("build api and worker images", timings), serve_index(index) as index_url:
            build_service_images(index_url, timings)
        with phase("stack up", timings):
            stack_up = True
            stack.compose("down", "--volumes", "--remove-orphans")  # a previous run's leftovers
            stack.up()
        with phase("API key", timings):
            swav = Swav(stack.url, create_key(stack))
        out = Path(tempfile.mkdtemp(prefix="compose-test-"))
        images = write_shapes_dataset(out / "images", per_class=16, size=32)
        with phase("cpu-tiny job end to end", timings):
            first = run_first_job(swav, images, out)
        with phase("worker restarted mid-job", timings):
            second = restart_worker_mid_job(stack, swav, first["dataset"]["id"])
        with phase("down and up, volumes kept", timings):
            check_persistence(stack, swav, [first["job"], second], out)
        with phase("containers run as uid 10001", timings):
            check_users(stack)
        say("\ncompose-test passed")
        return 0
    except (Failure, subprocess.TimeoutExpired) as exc:
        say(f"\ncompose-test FAILED: {exc}")
        if stack_up:
            stack.compose("logs", "--tail", "60", check=False)
        return 1
    finally:
        if stack_up:
            logs = stack.compose("logs", "--no-color", capture=True, check=False, quiet=True)
            (STATE / "stack.log").write_text(logs.stdout)  # the services' own output
            with phase("stack down (volumes removed)", timings):
                stack.compose("down", "--volumes", "--remove-orphans", check=False)
        timings["total"] = round(time.monotonic() - started, 1)
        with open(STATE / "timings.jsonl", "a") as log:
            log.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  **timings}) + "\n")
        say("\ntimings (s): " + json.dumps(timings))


if __name__ == "__main__":
    sys.exit(main())
