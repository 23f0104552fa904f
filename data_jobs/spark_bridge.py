"""PySpark on the Ray cluster: RayDP starts Spark's executors as Ray actors.

:func:`spark_on_ray` gives a ``SparkSession`` whose master and executors run on the Ray
cluster this process is connected to (``ray.init`` first; ``cluster.deploy.connected``
does it from the settings). A PySpark job written for any Spark cluster runs unchanged
on it, and data moves between Spark and Ray Data through Ray's object store, with no
file in between: ``dataset.to_spark(spark)`` and ``ray.data.from_spark(frame)``.

Versions that work together (``pip install 'rayline[spark]'``, pinned in pyproject):
Ray 2.60, RayDP 1.6.5, PySpark 3.5.7 and a Java 17 runtime (``java`` on PATH). On
Java 17 Spark needs the JDK's internals opened to it (``--add-opens``, the list Spark's
own launcher passes, plus those RayDP's object-store transfer needs); the Spark driver,
RayDP's app master and every executor get them here. The executors' Python workers run
this process's interpreter (not the ``python3`` on PATH), so they import what it imports.

Resources: each executor asks Ray for ``executor_cpus`` CPUs (a fraction is allowed, so
a busy small cluster still places them) and ``executor_memory`` of memory; RayDP's
master asks for none. The session is stopped, and its actors gone, when the block ends.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from core.exceptions import InvalidInputError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_OPENED_PACKAGES = (
    "java.io",
    "java.lang",
    "java.lang.invoke",
    "java.lang.reflect",
    "java.math",
    "java.net",
    "java.nio",
    "java.security",
    "java.text",
    "java.time",
    "java.util",
    "java.util.concurrent",
    "java.util.concurrent.atomic",
    "jdk.internal.misc",
    "jdk.internal.ref",
    "sun.nio.ch",
    "sun.nio.cs",
    "sun.security.action",
    "sun.util.calendar",
)
JAVA_OPTIONS = " ".join(
    [
        "-XX:+IgnoreUnrecognizedVMOptions",
        *(f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in _OPENED_PACKAGES),
        "--add-opens=java.sql/java.sql=ALL-UNNAMED",
        "-Djdk.reflect.useDirectMethodHandle=false",
    ]
)
"""What Spark on Java 17 needs opened of the JDK (see the module)."""


@contextmanager
def spark_on_ray(
    app_name: str,
    *,
    executors: int = 1,
    executor_cores: int = 1,
    executor_cpus: float = 0.5,
    executor_memory: str = "1g",
    shuffle_partitions: int = 4,
) -> Iterator[SparkSession]:
    """A Spark session with its executors as actors of the connected Ray cluster.

    Raises:
        InvalidInputError: PySpark and RayDP are not installed, or no ``java`` is on
            PATH (the message says how to install them).
    """
    try:
        import raydp
    except ImportError as exc:
        raise InvalidInputError(
            f"the PySpark bridge needs RayDP and PySpark ({exc.name} is missing): "
            "pip install 'rayline[spark]'"
        ) from None
    if shutil.which("java") is None:
        raise InvalidInputError(
            "the PySpark bridge needs a Java 17 runtime on PATH: apt-get install "
            "openjdk-17-jre-headless (or set PATH to a JDK's bin)"
        )
    session = raydp.init_spark(
        app_name,
        num_executors=executors,
        executor_cores=executor_cores,
        executor_memory=executor_memory,
        configs={
            "spark.driver.memory": "512m",
            "spark.driver.extraJavaOptions": JAVA_OPTIONS,
            "spark.executor.extraJavaOptions": JAVA_OPTIONS,
            "spark.ray.raydp_app_master.extraJavaOptions": JAVA_OPTIONS,
            "spark.ray.raydp_spark_executor.actor.resource.cpu": str(executor_cpus),
            "spark.ray.raydp_spark_master.actor.resource.CPU": "0",
            "spark.pyspark.python": sys.executable,
            "spark.executorEnv.PYSPARK_PYTHON": sys.executable,
            "spark.sql.shuffle.partitions": str(shuffle_partitions),
            "spark.sql.session.timeZone": "UTC",
            "spark.ui.showConsoleProgress": "false",
        },
    )
    # PySpark names the Python of its workers once, from PYSPARK_PYTHON or "python3";
    # it is this interpreter, whatever the environment says.
    session.sparkContext.pythonExec = sys.executable
    try:
        yield session
    finally:
        raydp.stop_spark()
