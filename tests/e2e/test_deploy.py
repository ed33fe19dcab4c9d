"""The container deployment: docker-compose.yml, docker/*.Dockerfile, .env.example.

The pytest suite starts no Docker engine (`make compose-test`, docker/ci/compose_test.py,
builds the images and runs the stack for real), so here the compose file is checked as data
(services, healthchecks, volumes, dependencies, queues), and then each service's own
command runs natively with its compose environment moved onto this machine: the host names postgres
and redis become 127.0.0.1 with a fresh database and a fresh Redis database number, /data
becomes a temporary folder. The Dockerfiles are checked to install what the README and
pyproject.toml say, in a multi-stage build whose final stage runs as a non-root user.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from sqlalchemy.engine import make_url

from swav_service.db import make_engine
from swav_service.settings import Settings
from tests.conftest import (
    BIN,
    REDIS_URL,
    ROOT,
    Service,
    create_database,
    drop_database,
    free_port,
    service_env,
)
from tests.e2e.test_service_e2e import run_to_success, upload_ready_dataset, wait_for

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

SERVICES = {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-short", "worker-cpu"}
CODE_SERVICES = ("migrate", "api", "worker-gpu", "worker-short", "worker-cpu")
WORKERS = ("worker-gpu", "worker-short", "worker-cpu")
DATA_ROOT = "/data"  # SWAV_DATA_DIR in the images and in the compose environment


# --- compose file as docker compose reads it ----------------------------------------------

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, and $$ for $.
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as docker compose reads .env (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """`value` with compose's variable syntax substituted, recursively; a missing required
    variable raises KeyError with compose's message."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        present = name in variables and (variables[name] != "" or op in ("-", "?"))
        if present:
            return variables[name]
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return VARIABLE.sub(substitute, value)


def referenced_variables() -> dict[str, set[str]]:
    """Each variable the compose file uses, with the operators it is used with ('' alone)."""
    found: dict[str, set[str]] = {}
    for match in VARIABLE.finditer(COMPOSE_FILE.read_text()):
        if match.group("name"):
            found.setdefault(match.group("name"), set()).add(match.group("op") or "")
    return found


def compose() -> dict[str, Any]:
    """docker-compose.yml parsed (YAML merge keys resolved) and interpolated with the values
    of .env.example, i.e. what `cp .env.example .env && docker compose config` shows."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), read_env_file(ENV_EXAMPLE))


def named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """{volume: path in the container} for the service's short-syntax volume mounts."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[source] = target
    return mounts


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def conditions(service: dict[str, Any]) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in service.get("depends_on", {}).items()}


# --- the compose file --------------------------------------------------------------------


def test_compose_has_the_services_healthchecks_volumes_and_dependencies() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == SERVICES
    assert set(spec["volumes"]) == {"pgdata", "redisdata", "artifacts"}

    postgres = services["postgres"]
    assert named_mounts(postgres) == {"pgdata": "/var/lib/postgresql/data"}
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]

    redis_service = services["redis"]
    command = redis_service["command"]
    assert command[0] == "redis-server"
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert named_mounts(redis_service) == {"redisdata": "/data"}  # where the AOF is written
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])

    # Migrations run once, after PostgreSQL is healthy; everything else waits for them.
    migrate = services["migrate"]
    assert migrate["command"] == ["swav-service", "migrate"]
    assert migrate["restart"] == "no"
    assert conditions(migrate) == {"postgres": "service_healthy"}
    for name in ("api", *WORKERS):
        assert conditions(services[name]) == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "migrate": "service_completed_successfully",
        }, name

    api = services["api"]
    assert "http://127.0.0.1:8000/readyz" in " ".join(api["healthcheck"]["test"])
    assert option(api["command"], "--port") == "8000"
    assert api["ports"] == ["127.0.0.1:8000:8000"]  # local only unless .env says otherwise

    # The GPU worker reserves an NVIDIA GPU; the CPU worker is the same process without
    # one, started only with `--profile cpu`. Everything else starts with a plain `up`.
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"]
    assert [n for n in SERVICES if "profiles" in services[n]] == ["worker-cpu"]
    assert services["worker-cpu"]["command"] == services["worker-gpu"]["command"]

    # Training and short tasks on separate queues, served by separate workers.
    fields = Settings.model_fields
    train, short = fields["train_queue"].default, fields["short_queue"].default
    queues = {name: option(services[name]["command"], "--queues") for name in WORKERS}
    assert queues == {"worker-gpu": train, "worker-short": short, "worker-cpu": train}
    for name in WORKERS:
        assert services[name]["command"][:2] == ["swav-service", "worker"]
        assert services[name]["shm_size"] == "8gb"  # DataLoader workers share batches via shm
        assert services[name]["init"] is True

    # One environment for every process of the service, and one artifact volume mounted
    # where that environment puts the artifacts, in the API and in every worker.
    environment = services["api"]["environment"]
    for name in CODE_SERVICES:
        assert services[name]["environment"] == environment, name
    assert environment["SWAV_DATA_DIR"] == DATA_ROOT
    for name in ("api", *WORKERS):
        assert named_mounts(services[name]) == {"artifacts": environment["SWAV_ARTIFACTS_DIR"]}

    # The API image runs migrate and the API; the worker image runs the workers.
    for name in CODE_SERVICES:
        dockerfile = API_DOCKERFILE if name in ("migrate", "api") else WORKER_DOCKERFILE
        assert services[name]["build"] == {
            "context": ".",
            "dockerfile": str(dockerfile.relative_to(ROOT)),
        }, name
    assert services["migrate"]["image"] == services["api"]["image"]
    assert len({services[name]["image"] for name in WORKERS}) == 1


def test_service_urls_name_the_compose_database_and_broker() -> None:
    spec = compose()
    example = read_env_file(ENV_EXAMPLE)
    environment = spec["services"]["api"]["environment"]
    postgres = spec["services"]["postgres"]["environment"]

    database = make_url(environment["SWAV_DATABASE_URL"])
    assert (database.drivername, database.host, database.port) == ("postgresql", "postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert database.database == postgres["POSTGRES_DB"]
    assert database.password == postgres["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]

    broker = urlsplit(environment["SWAV_BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    redis_command = spec["services"]["redis"]["command"]
    assert broker.password == option(redis_command, "--requirepass") == example["REDIS_PASSWORD"]
    assert spec["services"]["redis"]["environment"]["REDISCLI_AUTH"] == example["REDIS_PASSWORD"]


def test_env_example_sets_every_variable_the_compose_file_needs() -> None:
    used = referenced_variables()
    required = {name for name, ops in used.items() if ops & {"", ":?", "?"}}
    example = read_env_file(ENV_EXAMPLE)
    assert required == {"POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    assert required <= set(example)
    assert set(example) <= set(used), "variables in .env.example that compose never reads"
    # Without a .env the compose file refuses to start instead of using no password.
    with pytest.raises(KeyError, match="set POSTGRES_PASSWORD in .env"):
        interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), {})


# --- the Dockerfiles ----------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The build stages, with each FROM's ARG defaults substituted and continuation lines
    joined (comment lines dropped, also inside a continued instruction, as Docker does)."""
    logical, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    defaults: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, value = args.partition("=")
            defaults[name] = value
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args).split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` the stage's RUN instructions make."""
    installs = []
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                if word.endswith("/pip") and words[i + 1] == "install":
                    installs.append(words[i + 2 :])
    return installs


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def torch_requirements() -> list[str]:
    """pyproject.toml's torch and torchvision requirements, e.g. 'torch>=2.10,<2.15'."""
    deps = pyproject()["project"]["dependencies"]
    found = [d for d in deps if re.match(r"torch(vision)?[<>=!~ ]", d)]
    assert len(found) == 2, deps
    return sorted(found)


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.stem)
def test_dockerfile_installs_the_readme_dependency_set(dockerfile: Path) -> None:
    pins = torch_requirements()
    # The README's setup sentence names the same bounds ...
    readme = (ROOT / "README.md").read_text()
    assert sorted(re.findall(r"`(torch(?:vision)?[<>=][^`]*)`", readme)) == pins
    # ... and `make setup` installs the project editable, which brings the rest.
    assert re.search(r"pip install .*-e '\.\[dev\]'", (ROOT / "Makefile").read_text())

    builder = parse_dockerfile(dockerfile)[-2]
    installs = pip_installs(builder)
    assert installs[0] == ["--upgrade", "pip"]
    # torch and torchvision first, from a wheel index (CPU or CUDA build), with the bounds
    # of pyproject.toml: the project install then finds them satisfied and keeps them.
    index_flag, index, *requirements = installs[1]
    assert index_flag == "--index-url" and index.startswith("${TORCH_INDEX_URL")
    assert sorted(requirements) == pins
    # Then the project itself, editable as in `make setup` (api/cli.py finds alembic.ini
    # and migrations/ beside the source), without the dev extra, and nothing else.
    assert installs[2:] == [["-e", "."]]
    assert builder.all("WORKDIR") == ["/app"] and builder.all("COPY")[-1] == ". ."


def test_images_are_multi_stage_non_root_without_build_tools() -> None:
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    api_stages = parse_dockerfile(API_DOCKERFILE)
    worker_stages = parse_dockerfile(WORKER_DOCKERFILE)

    api_base = api_stages[-1].base
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", api_base)
    assert api_stages[-2].base == api_base  # the venv's interpreter is the same file
    assert Version("3.11.99") in requires
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", worker_stages[-1].base)
    assert worker_stages[-2].base == worker_stages[-1].base
    assert any("uv python install 3.11 " in run for run in worker_stages[-2].all("RUN"))

    uids = set()
    compose_commands = compose()["services"]
    for stages, service in ((api_stages, "api"), (worker_stages, "worker-gpu")):
        builder, final = stages[-2], stages[-1]
        assert builder.name == "builder" and final.name is None
        # Only the builder installs; the final stage copies its results.
        final_runs = " ".join(final.all("RUN"))
        for tool in ("pip", "apt-get", "uv ", "gcc", "build-essential", "curl"):
            assert tool not in final_runs, (service, tool)
        copies = final.all("COPY")
        assert "--from=builder /opt/venv /opt/venv" in copies
        assert "--from=builder /app /app" in copies
        # A non-root user owns the data folder, and the processes run as that user.
        users = final.all("USER")
        assert users and users[-1] not in ("root", "0")
        [uid] = re.findall(r"useradd --uid (\d+) .* " + users[-1] + r"\b", final_runs)
        uids.add(uid)
        assert f"chown -R {users[-1]}:{users[-1]} {DATA_ROOT}" in final_runs
        env = " ".join(final.all("ENV"))
        assert f"SWAV_DATA_DIR={DATA_ROOT}" in env and "PATH=/opt/venv/bin:$PATH" in env
        # Started alone (`docker run IMAGE`), an image does what its compose service does.
        assert json.loads(final.all("CMD")[-1]) == compose_commands[service]["command"]
    # The API and the workers write the same artifact volume, so one owner.
    assert len(uids) == 1


def test_dockerignore_keeps_local_state_out_and_the_project_in() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "var", "tests"} <= ignored
    packages = [p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]
                ["include"]]
    needed = ["pyproject.toml", "README.md", "alembic.ini", "migrations", "bench", *packages]
    assert not [name for name in needed if name in ignored]


# --- each service's command, run natively -------------------------------------------------


class NativeDeployment:
    """The compose services' commands and environment, on this machine's PostgreSQL and
    Redis: host names to 127.0.0.1, a fresh database and Redis number, /data to a folder."""

    def __init__(self, database_url: str, broker_url: str, data_dir: Path) -> None:
        self.spec = compose()["services"]
        self.database_url = database_url
        env = service_env(data_dir, database_url, broker_url)
        for key, value in self.spec["api"]["environment"].items():
            env[key] = self.localize(key, value, database_url, broker_url, data_dir)
        self.service = Service(env, data_dir)
        self.port = free_port()

    @staticmethod
    def localize(key: str, value: str, database_url: str, broker_url: str, data: Path) -> str:
        if key == "SWAV_DATABASE_URL":
            assert make_url(value).host == "postgres", value
            return database_url
        if key == "SWAV_BROKER_URL":
            assert urlsplit(value).hostname == "redis", value
            return broker_url
        if value == DATA_ROOT or value.startswith(DATA_ROOT + "/"):
            return str(data) + value[len(DATA_ROOT) :]
        return value

    def argv(self, words: list[str]) -> list[str]:
        """A compose command (or healthcheck) for this machine: the venv's executables,
        loopback instead of all interfaces, and a free port instead of 8000."""
        out = []
        for word in words:
            if word in ("swav-service", "python"):
                word = str(BIN / "swav-service") if word == "swav-service" else sys.executable
            elif word == "0.0.0.0":
                word = "127.0.0.1"
            word = word.replace("8000", str(self.port))
            out.append(word)
        return out

    def run_once(self, name: str) -> None:
        command = self.argv(self.spec[name]["command"])
        subprocess.run(command, env=self.service.env, cwd=ROOT, check=True, timeout=120)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        command = self.argv(self.spec[name]["command"])
        assert command[0] == str(BIN / "swav-service")
        return self.service._spawn(*command[1:])

    def healthcheck(self, name: str) -> int:
        kind, *words = self.spec[name]["healthcheck"]["test"]
        assert kind == "CMD"
        return subprocess.run(self.argv(words), env=self.service.env, timeout=30).returncode


@pytest.fixture
def native(tmp_path: Path) -> Iterator[NativeDeployment]:
    database_url = create_database()
    broker_url = f"{REDIS_URL}/{1 + int(secrets.token_hex(1), 16) % 14}"
    redis.Redis.from_url(broker_url).flushdb()
    (tmp_path / "data").mkdir()
    deployment = NativeDeployment(database_url, broker_url, tmp_path / "data")
    try:
        yield deployment
    finally:
        deployment.service.stop()
        drop_database(database_url)


def test_migrate_command_reaches_head(native: NativeDeployment) -> None:
    native.run_once("migrate")
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    engine = make_engine(native.database_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    assert head is not None and current == head


def test_api_and_worker_commands_run_a_cpu_tiny_job(
    native: NativeDeployment, shapes_dir: Path
) -> None:
    service = native.service
    native.run_once("migrate")
    assert native.healthcheck("api") != 0  # nothing listens yet: the check must fail
    native.start("api")
    native.start("worker-short")
    native.start("worker-gpu")  # on this machine, the same process on the CPU
    service.base_url = f"http://127.0.0.1:{native.port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, "/readyz 200", service)
    assert native.healthcheck("api") == 0
    with service.client() as client:
        dataset = upload_ready_dataset(client, service, shapes_dir)
        job = run_to_success(client, service, dataset["id"])
    assert job["status"] == "succeeded"
    artifacts = Path(service.env["SWAV_ARTIFACTS_DIR"])
    assert (artifacts / "jobs" / job["id"]).is_dir()  # written where the volume is mounted
