"""Packaging: the repository root is the package root of ``migrateflow``.

``package_dir={"migrateflow": "."}`` maps the top-level folders (flows/, tasks/,
drivers/, conf/, ...) to ``migrateflow.flows``, ``migrateflow.tasks``, ... so
nothing named flows/tasks/conf/tests lands top-level in site-packages.  Tests
and benchmarks stay out of the wheel.
"""
from setuptools import setup

PACKAGES = [
    "migrateflow",
    "migrateflow.conf",
    "migrateflow.db",
    "migrateflow.db.migrations",
    "migrateflow.db.migrations.versions",
    "migrateflow.drivers",
    "migrateflow.drivers.libvirt",
    "migrateflow.flows",
    "migrateflow.tasks",
]

setup(
    name="migrateflow",
    version="0.1.0",
    description="Durable TaskFlow workflows that move virtual machines between compute hosts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    package_dir={"migrateflow": "."},
    packages=PACKAGES,
    package_data={"migrateflow.db.migrations": ["script.py.mako"]},
    install_requires=[
        # engine.py subclasses TaskFlow's serial engine and storage (one
        # write per atom transition, reused compilations): checked against
        # 6.5 by tests/test_perf_engine.py and the crash matrices
        "taskflow>=6.5,<7",
        "oslo.config>=9.0",
        "oslo.db>=17.0",
        "alembic>=1.13",
        "SQLAlchemy>=2.0",
        "stevedore>=5.0",
        "tenacity>=8.0",
        "rich>=13.0",
        # ZooKeeper client of the jobboard and of the zookeeper persistence
        # backend (TaskFlow's own "zookeeper" extra asks for kazoo>=2.6.0)
        "kazoo>=2.6",
        # issue 6: callers, policy and notifications in the ecosystem's forms
        "oslo.context>=5.0",
        "oslo.policy>=4.0",
        "oslo.messaging>=14.0",
    ],
    extras_require={
        # libvirt-python builds from source: tools/test-all.sh installs the
        # Debian packages it needs first (libvirt-dev pkg-config gcc python3-dev)
        "libvirt": ["libvirt-python>=9.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "build>=1.0", "libvirt-python>=9.0"],
        "sql-servers": ["psycopg2-binary>=2.9", "PyMySQL>=1.1"],
    },
    entry_points={
        "console_scripts": ["migrateflow = migrateflow.cli:main"],
        "oslo.config.opts": ["migrateflow = migrateflow.conf:list_opts"],
        # oslopolicy-sample-generator / -policy-generator --namespace migrateflow
        "oslo.policy.policies": ["migrateflow = migrateflow.policy:list_rules"],
        "oslo.policy.enforcer": ["migrateflow = migrateflow.policy:get_enforcer"],
        "migrateflow.drivers": [
            "fake = migrateflow.drivers.fake:FakeDriver",
            "libvirt = migrateflow.drivers.libvirt:LibvirtDriver",
        ],
    },
)
