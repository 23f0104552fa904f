"""The local stack: Kafka (KRaft), PostgreSQL, Redis and a Ray head as plain processes.

Everything lives under ``settings.paths.state_dir``: data, logs (``logs/``), PID files
(``run/``) and Ray's temp folder (``ray/``), with two exceptions forced from outside,
both named after the state folder and both removed by ``rayline down --purge``:

- PostgreSQL's cluster, when the ``postgres`` user cannot reach the state folder (a
  clone in a private home directory, run as root): ``/var/tmp/rayline-postgres-<digest>``,
  named in the state folder's ``postgres.location``. Such a cluster with no pointer
  beside a new state folder was left by a deleted one, and ``up`` removes it;
- Ray's temp folder, when the state folder's path is too long for Ray's Unix sockets:
  ``/tmp/rayline-ray-<digest>``.

Downloads (the Kafka jars and Maven's repository) go to ``settings.paths.cache_dir``
so that a new clone reuses them; they are a cache, not state, and ``--purge`` keeps them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters import cdc_catalog
from adapters import kafka as kafka_adapter
from adapters import kafka_connect as connect_adapter
from adapters import mqtt as mqtt_adapter
from adapters import postgres as pg_adapter
from adapters import redis as redis_adapter
from adapters import s3 as s3_adapter
from cluster import connect, local_secrets, mosquitto
from cluster.processes import (
    ProcessSpec,
    ServiceFailed,
    Supervisor,
    alive,
    log4j2_console,
    port_open,
)
from cluster.settings import PROJECT_ROOT, Settings
from core.exceptions import ConfigurationError

Say = Callable[[str], None]

_APT = (
    "apt-get install -y openjdk-17-jre-headless maven postgresql redis-server mosquitto "
    "mosquitto-clients"
)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running | stopped | external
    ports: tuple[int, ...]
    pid: int | None


def _need(binary: str, path: str | None = None) -> str:
    found = path if path and Path(path).exists() else shutil.which(binary)
    if found is None:
        prefix = "" if os.geteuid() == 0 else "sudo "
        raise ConfigurationError(f"{binary} is not installed; run `make setup` or `{prefix}{_APT}`")
    return found


def _postgres_bin(name: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for bindir in reversed(versions):
        if (bindir / name).exists():
            return str(bindir / name)
    return _need(name)


# Where the state folder says its PostgreSQL cluster lives, when that is outside it.
PG_POINTER = "postgres.location"
# The longest Ray temp folder path that keeps Ray's session sockets
# (<temp>/session_<date>_<time>_<pid>/sockets/plasma_store) within AF_UNIX's 107 bytes.
_RAY_TEMP_MAX = 40


def _reachable_by(user: str, folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["test", "-x", str(folder)], user=user, check=False)
    return probe.returncode == 0


class LocalStack:
    """Starts, stops and reports the local services described by the settings."""

    def __init__(self, settings: Settings, say: Say = lambda _msg: None) -> None:
        self.settings = settings
        self.say = say
        self.state = settings.paths.state_dir
        self.logs = self.state / "logs"
        self.supervisor = Supervisor(self.state / "run")

    # Specs -----------------------------------------------------------------------

    def specs(self) -> list[ProcessSpec]:
        s = self.settings
        specs = []
        if s.kafka.managed:
            specs.append(self._kafka_spec())
        if s.postgres.managed:
            specs.append(self._postgres_spec())
        if s.redis.managed:
            specs.append(self._redis_spec())
        if s.s3.managed:
            specs.append(self._s3_spec())
        if s.mqtt.managed:
            specs.append(self._mosquitto_spec())
        if s.cdc.managed:
            specs.append(self._connect_spec())
        if s.ray.managed:
            specs.append(self._ray_spec())
        return specs

    def _kafka_spec(self) -> ProcessSpec:
        k = self.settings.kafka
        home = self.state / "kafka"
        return ProcessSpec(
            name="kafka",
            argv=[
                "java",
                f"-Xmx{k.heap}",
                "-Xms128m",
                "-XX:-UsePerfData",  # no /tmp/hsperfdata_<user>/<pid>
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
                "-cp",
                f"{self._kafka_libs()}/*",
                "kafka.Kafka",
                str(home / "server.properties"),
            ],
            ports=[k.port, k.controller_port],
            ready=lambda: (
                port_open(k.port, k.host) and kafka_adapter.broker_answers(k.bootstrap, timeout=2.0)
            ),
            log_file=self.logs / "kafka.log",
        )

    def _postgres_spec(self) -> ProcessSpec:
        p = self.settings.postgres
        return ProcessSpec(
            name="postgres",
            argv=[
                _postgres_bin("postgres"),
                "-D",
                str(self._pg_data()),
                "-p",
                str(p.port),
                "-c",
                f"listen_addresses={p.host}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "wal_level=logical",
                "-c",
                "max_connections=200",
            ],
            ports=[p.port],
            ready=lambda: pg_adapter.answers(self._pg_admin_dsn()),
            log_file=self.logs / "postgres.log",
            user=self._pg_user(),
            stop_signal=signal.SIGINT,  # "fast" shutdown: do not wait for clients
        )

    def _redis_spec(self) -> ProcessSpec:
        # The password is in the configuration file (mode 0600), never on the command line.
        r = self.settings.redis
        password = r.password.get_secret_value() if r.password else None
        return ProcessSpec(
            name="redis",
            argv=[_need("redis-server"), str(self.state / "redis" / "redis.conf")],
            ports=[r.port],
            ready=lambda: redis_adapter.answers(r.host, r.port, password),
            log_file=self.logs / "redis.log",
            user=self._service_user("redis"),
        )

    def _s3_spec(self) -> ProcessSpec:
        # moto's server keeps every object in memory: enough for the local stack and
        # tests, gone on `down` (docs/uploads.md says so); production points at S3.
        s3 = self.settings.s3
        return ProcessSpec(
            name="s3",
            # Through a wrapper that makes moto check every request's signature against
            # the install's key pair, read from a file (mode 0600), not from argv.
            argv=[sys.executable, "-m", "cluster.s3_server", str(self._s3_credentials())],
            ports=[s3.port],
            ready=lambda: s3_adapter.answers(f"http://{s3.host}:{s3.port}"),
            log_file=self.logs / "s3.log",
            cwd=PROJECT_ROOT,
        )

    def _mosquitto_spec(self) -> ProcessSpec:
        m = self.settings.mqtt
        password = m.bridge_password.get_secret_value()
        return ProcessSpec(
            name="mosquitto",
            argv=[
                _need("mosquitto", "/usr/sbin/mosquitto"),
                "-c",
                str(mosquitto.config_path(self.settings)),
            ],
            ports=[m.port],
            ready=lambda: (
                port_open(m.port, m.host)
                and mqtt_adapter.broker_answers(m.host, m.port, m.bridge_username, password)
            ),
            log_file=self.logs / "mosquitto.log",
        )

    def _connect_spec(self) -> ProcessSpec:
        c = self.settings.cdc
        home = self.state / "connect"
        return ProcessSpec(
            name="connect",
            argv=[
                "java",
                f"-Xmx{c.heap}",
                "-Xms128m",
                "-XX:-UsePerfData",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
                "-cp",
                f"{self._connect_libs()}/*",
                "org.apache.kafka.connect.cli.ConnectDistributed",
                str(home / "worker.properties"),
            ],
            ports=[c.port],
            ready=lambda: connect_adapter.answers(c.url),
            log_file=self.logs / "connect.log",
            start_timeout=180,  # a JVM scanning its class path for plugins, on small machines
        )

    def _ray_spec(self) -> ProcessSpec:
        r, s = self.settings.ray, self.settings
        argv = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            r.host,
            "--port",
            str(r.port),
            "--dashboard-host",
            r.host,
            "--dashboard-port",
            str(r.dashboard_port),
            "--ray-client-server-port",
            str(r.client_port),
            "--dashboard-agent-listen-port",
            str(r.agent_port),
            # Ray's default worker port range (10002-19999) is kept clear of the
            # stack's own ports, which all sit above it.
            "--object-store-memory",
            str(r.object_store_mb * 1024 * 1024),
            "--temp-dir",  # sessions, logs, sockets, spilled objects: not /tmp/ray
            str(self._ray_temp()),
            "--disable-usage-stats",
        ]
        if r.num_cpus is not None:
            argv += ["--num-cpus", str(r.num_cpus)]
        return ProcessSpec(
            name="ray",
            argv=argv,
            ports=[r.port, r.dashboard_port, r.client_port, r.agent_port],
            ready=lambda: port_open(r.port, r.host) and port_open(r.dashboard_port, r.host),
            log_file=self.logs / "ray.log",
            env={
                "RAY_USAGE_STATS_ENABLED": "0",
                # Ray jobs run commands (`rayline verify ...`): this environment's are
                # found on PATH, as a cluster image's are.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
                **local_secrets.ray_environment(s),
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if s.serve.throughput_optimized else "0",
                "RAY_SERVE_ENABLE_HA_PROXY": "1" if s.serve.haproxy else "0",
            },
            start_timeout=120,
        )

    # Preparation -----------------------------------------------------------------

    def _kafka_libs(self) -> Path:
        pom = PROJECT_ROOT / "cluster" / "kafka" / "pom.xml"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
        return self.settings.paths.cache_dir / "kafka" / f"{self.settings.kafka.version}-{digest}"

    def fetch_kafka(self) -> Path:
        """Copy the broker's jars from Maven Central into the cache (first run only)."""
        version = self.settings.kafka.version
        return self._maven_copy(
            PROJECT_ROOT / "cluster" / "kafka" / "pom.xml",
            self._kafka_libs(),
            f"Apache Kafka {version}",
            {"kafka.version": version},
        )

    def _connect_libs(self) -> Path:
        pom = PROJECT_ROOT / "cluster" / "connect" / "pom.xml"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
        name = f"{self.settings.kafka.version}-{self.settings.cdc.debezium_version}-{digest}"
        return self.settings.paths.cache_dir / "connect" / name

    def fetch_connect(self) -> Path:
        """Copy Kafka Connect's and Debezium's jars from Maven Central (first run only)."""
        s = self.settings
        return self._maven_copy(
            PROJECT_ROOT / "cluster" / "connect" / "pom.xml",
            self._connect_libs(),
            f"Kafka Connect {s.kafka.version} with Debezium {s.cdc.debezium_version}",
            {"kafka.version": s.kafka.version, "debezium.version": s.cdc.debezium_version},
        )

    def _maven_copy(self, pom: Path, libs: Path, what: str, properties: dict[str, str]) -> Path:
        """Copy the runtime dependencies of ``pom`` into ``libs``, unless done before."""
        if (libs / ".complete").exists():
            return libs
        mvn = _need("mvn")
        _need("java")
        self.say(f"fetching {what} jars from Maven Central into {libs} ...")
        tmp = libs.with_name(libs.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            f"-Dmaven.repo.local={self.settings.paths.cache_dir / 'm2'}",
            "-f",
            str(pom),
            *(f"-D{name}={value}" for name, value in properties.items()),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceFailed(
                f"Maven could not fetch {what} (is Maven Central reachable?):\n"
                + result.stdout[-2000:]
                + result.stderr[-2000:]
            )
        (tmp / ".complete").write_text(what)
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        return libs

    def _prepare_kafka(self) -> None:
        k = self.settings.kafka
        home = self.state / "kafka"
        data = home / "data"
        home.mkdir(parents=True, exist_ok=True)
        (home / "server.properties").write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{k.host}:{k.controller_port}",
                    f"listeners=PLAINTEXT://{k.host}:{k.port},"
                    f"CONTROLLER://{k.host}:{k.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{k.host}:{k.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={data}",
                    f"num.partitions={k.raw_partitions}",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "message.max.bytes=10485760",
                    "",
                ]
            )
        )
        (home / "log4j2.properties").write_text(log4j2_console({"state.change.logger": "WARN"}))
        if (data / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # `-t -x...` would read as an option
            cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        result = subprocess.run(
            [
                "java",
                "-XX:-UsePerfData",
                "-cp",
                f"{self.fetch_kafka()}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(home / "server.properties"),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ServiceFailed(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _prepare_connect(self) -> None:
        """Jars, the worker's settings, and its compacted topics on a ready broker."""
        s = self.settings
        self.fetch_connect()
        connect.write_config(s, self.state / "connect")
        if s.kafka.managed:
            self.supervisor.wait_ready(self._kafka_spec())  # Connect exits without a broker
        created = kafka_adapter.ensure_topics(s.kafka.bootstrap, connect.topic_specs())
        if created:
            self.say(f"created topics {', '.join(created)}")

    def _prepare_cdc_database(self) -> None:
        """The captured database with its sample schema (``public.customers``)."""
        s = self.settings
        if pg_adapter.ensure_database(self._pg_admin_dsn(), s.cdc.database):
            self.say(f"created PostgreSQL database {s.cdc.database} (CDC sample)")
        dsn = s.postgres.model_copy(update={"database": s.cdc.database}).dsn()
        captured = cdc_catalog.CapturedDatabase(dsn)
        try:
            captured.create_sample_schema()
        finally:
            captured.close()

    def _pg_user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def _service_user(self, name: str) -> str | None:
        """The system user a service drops to when run by root (its Debian package made
        it), when that user can reach the state folder; else None: run as the caller."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(name)
        except KeyError:
            return None
        return name if _reachable_by(name, self.state) else None

    def _prepare_redis(self) -> None:
        """Redis's folder and configuration (with the password), owned by its user."""
        r = self.settings.redis
        home = self.state / "redis"
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {r.port}",
            f"bind {r.host}",
            f"dir {home}",
            'save ""',
            "appendonly no",
            "daemonize no",
        ]
        if r.password is not None:
            lines.append(f"requirepass {r.password.get_secret_value()}")
        _write_owned(home / "redis.conf", "\n".join(lines) + "\n", self._service_user("redis"))
        _chown_tree(home, self._service_user("redis"))

    def _s3_credentials(self) -> Path:
        return self.state / "s3" / "credentials.json"

    def _prepare_s3(self) -> None:
        s3 = self.settings.s3
        text = json.dumps(
            {
                "host": s3.host,
                "port": s3.port,
                "access_key_id": s3.access_key_id,
                "secret_access_key": s3.secret_access_key.get_secret_value(),
            }
        )
        _write_owned(self._s3_credentials(), text, None)

    def _pg_admin_dsn(self) -> str:
        p = self.settings.postgres
        return p.model_copy(update={"database": "postgres"}).dsn()

    def _digest(self) -> str:
        return hashlib.sha256(str(self.state).encode()).hexdigest()[:12]

    def _pg_outside(self) -> Path:
        """Where PostgreSQL's cluster goes when its user cannot reach the state folder."""
        return Path("/var/tmp") / f"rayline-postgres-{self._digest()}"

    def _ray_outside(self) -> Path:
        """Where Ray's temp folder goes when the state folder's path is too long."""
        return Path("/tmp") / f"rayline-ray-{self._digest()}"

    def _pg_root(self) -> Path:
        """Where PostgreSQL keeps its cluster: in the state folder when its user can
        reach it, else in a folder of its own under /var/tmp named after the state folder
        (a clone under a private home directory, such as /root, is not reachable)."""
        preferred = self.state / "postgres"
        user = self._pg_user()
        if user is None or _reachable_by(user, self.state):
            return preferred
        return self._pg_outside()

    def _ray_temp(self) -> Path:
        """Ray's temp folder: ``ray/`` in the state folder when its path is short enough
        for Ray's Unix sockets, else a folder of its own under /tmp."""
        inside = self.state.absolute() / "ray"
        return inside if len(str(inside)) <= _RAY_TEMP_MAX else self._ray_outside()

    def outside_folders(self) -> list[Path]:
        """The folders outside the state folder that hold this stack's data, as they
        exist now (see the module docstring)."""
        return [p for p in (self._pg_outside(), self._ray_outside()) if p.exists()]

    def _pg_data(self) -> Path:
        return self._pg_root() / "data"

    def prepare_postgres(self, fresh: bool = False) -> None:
        """Create the PostgreSQL cluster unless it exists (``initdb``).

        Args:
            fresh: The state folder is new (it was missing or empty when ``up``
                began). A cluster outside it with no pointer to it is then left over
                from a deleted state folder, and is removed first.
        """
        root = self._pg_root()
        if root != self.state / "postgres":
            self._claim_outside_postgres(root, fresh)
        data = self._pg_data()
        if (data / "PG_VERSION").exists():
            return
        user = self._pg_user()
        root.mkdir(parents=True, exist_ok=True)
        if user is not None:
            # PostgreSQL refuses to run as root; its folder must belong to its user.
            shutil.chown(root, user, user)
            root.chmod(0o700)
        self.say(f"creating the PostgreSQL cluster in {root} (initdb) ...")
        password = self.settings.postgres.password
        # The superuser's password goes to initdb in a file (mode 0600, its user's),
        # removed right after; every connection then needs it (scram-sha-256).
        pwfile = root / "initdb.pw"
        secret = password.get_secret_value() if password is not None else ""
        _write_owned(pwfile, secret + "\n", user)
        auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"] if password else ["-A", "trust"]
        try:
            result = subprocess.run(
                [
                    _postgres_bin("initdb"),
                    "-D",
                    str(data),
                    *auth,
                    "-U",
                    self.settings.postgres.user,
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                user=user,
                group=user,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceFailed(f"initdb failed:\n{result.stdout}{result.stderr}")

    def _lock_postgres(self) -> None:
        """Give a cluster made with ``trust`` (by an earlier Rayline) the password and
        scram-sha-256 authentication, once: while trust is on, the password is ignored,
        so the running server is reached, told the password and made to reload."""
        p = self.settings.postgres
        hba = self._pg_data() / "pg_hba.conf"
        if p.password is None or not hba.exists():
            return
        if not any(
            line.split()[-1:] == ["trust"]
            for line in hba.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ):
            return
        self.say("PostgreSQL used trust authentication: setting its password (scram-sha-256)")
        pg_adapter.set_password(self._pg_admin_dsn(), p.user, p.password.get_secret_value())
        text = (
            "# written by rayline up: every connection needs the password\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            "local replication all scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
            "host replication all ::1/128 scram-sha-256\n"
        )
        _write_owned(hba, text, self._pg_user())
        pg_adapter.reload_configuration(self._pg_admin_dsn())

    def _claim_outside_postgres(self, root: Path, fresh: bool) -> None:
        """Make the cluster outside the state folder the state folder's own.

        One that exists while a new state folder has no pointer to it was left by a
        deleted state folder: its checkpoints name offsets of Kafka topics that are
        gone with it, so it is removed. Beside an existing state folder (made before
        pointers were written) it is kept.
        """
        pointer = self.state / PG_POINTER
        if fresh and not pointer.exists() and root.exists():
            pid = _postmaster_pid(root / "data")
            if pid is not None and alive(pid):
                raise ServiceFailed(
                    f"PostgreSQL (PID {pid}) still runs on {root}, a cluster left by a "
                    f"deleted state folder; stop it (`kill -INT {pid}`), then run "
                    "`rayline up` again"
                )
            self.say(
                f"removing the PostgreSQL cluster in {root}: it was left by a deleted state "
                "folder, and its checkpoints name offsets of Kafka topics that are gone"
            )
            shutil.rmtree(root)
        self.state.mkdir(parents=True, exist_ok=True)
        pointer.write_text(f"{root}\n")

    # Lifecycle -------------------------------------------------------------------

    def up(self) -> list[ServiceStatus]:
        """Start every managed service that is not running and wait until all answer."""
        s = self.settings
        ours = {local_secrets.FILE_NAME, local_secrets.RAY_TOKEN_FILE}  # written before `up`
        fresh = not self.state.exists() or all(p.name in ours for p in self.state.iterdir())
        (self.state / "redis").mkdir(parents=True, exist_ok=True)
        specs = self.specs()
        for spec in specs:
            if self.supervisor.pid(spec) is not None:
                continue
            if spec.name == "kafka":
                self.fetch_kafka()
                self._prepare_kafka()
            elif spec.name == "postgres":
                self.prepare_postgres(fresh)
            elif spec.name == "connect":
                self._prepare_connect()
            elif spec.name == "mosquitto":
                mosquitto.prepare(s, self._service_user("mosquitto"))
            elif spec.name == "redis":
                self._prepare_redis()
            elif spec.name == "s3":
                self._prepare_s3()
            self.say(f"starting {spec.name} on port {', '.join(map(str, spec.ports))} ...")
            self.supervisor.launch(spec)
        for spec in specs:
            self.supervisor.wait_ready(spec)
        if s.postgres.managed:
            self._lock_postgres()
        created = kafka_adapter.ensure_topics(
            s.kafka.bootstrap,
            [
                # the broker stamps each raw event with its append time: the workers'
                # watermarks move on it, whatever clock a producer has
                kafka_adapter.TopicSpec(
                    s.kafka.raw_topic,
                    s.kafka.raw_partitions,
                    {"message.timestamp.type": "LogAppendTime"},
                ),
                kafka_adapter.TopicSpec(s.kafka.dlq_topic, 1),
                kafka_adapter.TopicSpec(s.kafka.alerts_topic, 1),
            ],
        )
        if created:
            self.say(f"created topics {', '.join(created)}")
        if pg_adapter.ensure_database(self._pg_admin_dsn(), s.postgres.database):
            self.say(f"created PostgreSQL database {s.postgres.database}")
        applied = pg_adapter.migrate(s.postgres.dsn())
        if applied:
            self.say(f"applied PostgreSQL migrations {applied}")
        if s.cdc.managed:
            self._prepare_cdc_database()
        if s.mqtt.managed:
            # Devices added before a restart connect again: the file comes from PostgreSQL.
            mosquitto.sync_devices(s, self.supervisor.pid(self._mosquitto_spec()))
        if s.s3.managed and s3_adapter.S3Store(s3_adapter.S3Config.of(s.s3)).ensure_bucket():
            self.say(f"created S3 bucket {s.s3.bucket}")
        return self.status()

    def restart(self, name: str) -> None:
        """Stop one service and start it again on its existing data."""
        (spec,) = [s for s in self.specs() if s.name == name]
        self.supervisor.stop(spec)
        self.supervisor.launch(spec)
        self.supervisor.wait_ready(spec)

    def down(self) -> list[str]:
        """Stop every service this stack started, Ray first; return the names stopped."""
        # Ray and the services that write to Kafka first, then Kafka, then the stores.
        order = {"ray": 0, "kafka": 2, "redis": 3, "postgres": 4}
        stopped = []
        for spec in sorted(self.specs(), key=lambda sp: order.get(sp.name, 1)):
            if self.supervisor.stop(spec):
                stopped.append(spec.name)
        return stopped

    def purge(self) -> list[Path]:
        """Remove the state folder and the folders outside it that hold this stack's
        data; return those removed. Stop the services first (``down``).

        Raises:
            ConfigurationError: The state folder is one that must not be deleted whole
                (``/``, the home directory, the project or a folder above them).
        """
        state = self.state.resolve()
        keep = (Path(state.anchor), Path.home().resolve(), PROJECT_ROOT)
        if any(state == k or state in k.parents for k in keep):
            raise ConfigurationError(
                f"refusing to delete {state}: paths.state_dir must be a folder of its own "
                f"(the default is {PROJECT_ROOT / '.state'})"
            )
        removed = []
        for folder in [*self.outside_folders(), self.state]:
            if folder.exists():
                shutil.rmtree(folder)
                removed.append(folder)
        return removed

    def status(self) -> list[ServiceStatus]:
        rows = []
        for spec in self.specs():
            pid = self.supervisor.pid(spec)
            rows.append(
                ServiceStatus(spec.name, "running" if pid else "stopped", tuple(spec.ports), pid)
            )
        return rows

    def local_state(self) -> dict[str, object]:
        """Where this stack keeps its data: the state folder and any folder outside it."""
        return {"folder": str(self.state), "outside": [str(p) for p in self.outside_folders()]}

    def listening_ports(self) -> list[int]:
        """Ports of the local stack on which something still accepts connections."""
        return [p for p in self.settings.local_ports().values() if port_open(p)]


def _postmaster_pid(data: Path) -> int | None:
    """The PID in a PostgreSQL data folder's ``postmaster.pid``, if any."""
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _write_owned(file: Path, text: str, user: str | None) -> None:
    """Replace ``file`` atomically with ``text``, mode 0600, owned by ``user`` (or the
    caller): a service's configuration that holds a secret."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if user is not None:
        shutil.chown(tmp, user, user)
    tmp.replace(file)


def _chown_tree(folder: Path, user: str | None) -> None:
    """Give ``folder`` and everything in it to ``user`` (nothing when None)."""
    if user is None:
        return
    shutil.chown(folder, user, user)
    for path in folder.rglob("*"):
        shutil.chown(path, user, user)
