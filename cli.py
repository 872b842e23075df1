"""The ``migrateflow`` command: the Python API (``api.MigrationAPI``) for a
person at a terminal.

``main(argv)`` can be called in-process any number of times (the tests do):
oslo.config is parsed again each call, and only options given on the
command line become overrides, restored when the call ends, so whatever
the caller already overrode (a test fixture, the demo) stays in force.
Refused requests print ``error: <reason>`` and exit 2, never a traceback.
Commands act as the cloud administrator unless ``--as-user USER
--as-project PROJECT [--as-role ROLE ...]`` names another caller (roles
default to ``member``), so a policy refusal can be seen from the terminal.
"""
import argparse
import contextlib
import datetime
import logging
import sys
import time

import sqlalchemy as sa
from oslo_config import cfg
from oslo_db import exception as db_exc
from rich import progress as rp
from rich.console import Console
from rich.table import Table

from migrateflow import api as api_mod
from migrateflow import cli_moves, graph, scheduler, service
from migrateflow import context as context_mod
from migrateflow import exceptions as exc
from migrateflow.conf import CONF
from migrateflow.states import LIVE_TERMINAL, MoveStatus
from migrateflow.states import LiveMigrationStatus as Status

LOG = logging.getLogger(__name__)
POLL_SECONDS = 0.1
_UNSET = object()


# -- configuration ----------------------------------------------------------------------
@contextlib.contextmanager
def config_overrides(values, conf=CONF):
    """Override ``{(name, group): value}`` for the block, then put back the
    overrides that were there before (oslo.config has no public getter for
    an override, hence ``_get_opt_info``)."""
    saved = []
    try:
        for (name, group), value in values.items():
            saved.append((name, group, conf._get_opt_info(name, group).get("override", _UNSET)))
            conf.set_override(name, value, group=group)
        yield conf
    finally:
        for name, group, previous in reversed(saved):
            if previous is _UNSET:
                conf.clear_override(name, group=group)
            else:
                conf.set_override(name, previous, group=group)


def masked_url(url):
    """A database URL safe to print: the password is replaced by ***."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never echo what we could not parse
        return "<unparseable URL>"


def scrub(text):
    """``text`` with any password of a URL in it replaced by ***."""
    return context_mod.mask(text)


@contextlib.contextmanager
def _logging(args):
    """Log to stderr for this call only: warnings by default (info for the
    conductor, a service), -v info, --debug everything (TaskFlow's own
    chatter only with --debug)."""
    service = args.command == "conductor"
    level = (logging.DEBUG if args.debug else
             logging.INFO if args.verbose or service else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        context_mod.LOG_FORMAT if service else "%(levelname)s %(name)s [request="
        "%(request_id)s migration=%(migration_id)s] %(message)s"))
    handler.addFilter(context_mod.ContextFilter())
    handler.setLevel(level)
    root, tf_log = logging.getLogger(), logging.getLogger("taskflow")
    saved = root.level, tf_log.level
    root.addHandler(handler)
    root.setLevel(min(level, root.level or level))
    tf_log.setLevel(logging.DEBUG if args.debug else logging.CRITICAL)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        tf_log.setLevel(saved[1])


# -- live migration with progress -----------------------------------------------------------
def progress_line(mig):
    return (f"{mig['status']:<9} step={mig['current_step'] or '-'} "
            f"memory={mig['memory_processed_mb']}/{mig['memory_total_mb']} MiB "
            f"iteration={mig['iteration']}")


def _poll(api, migration_id, on_update, notify):
    """Poll the record until a terminal status.  The first Ctrl-C asks for
    an abort (the rollback leaves the guest on the source), a second one
    stops watching."""
    abort_sent = False
    while True:
        try:
            mig = api.show_migration(migration_id)
            on_update(mig)
            if mig["status"] in LIVE_TERMINAL:
                return mig
            time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            if abort_sent:
                raise
            abort_sent = True
            try:
                api.abort(migration_id)
                notify("abort requested; waiting for the rollback (Ctrl-C again to stop)")
            except exc.MigrateflowError as err:
                notify(f"cannot abort: {err.message}")


def watch(api, migration_id, console):
    """Show progress until the migration ends: a rich bar on a terminal,
    one plain line per change otherwise (logs and pipes)."""
    if not console.is_terminal:
        last = []

        def plain(mig):
            if progress_line(mig) not in last[-1:]:
                last.append(progress_line(mig))
                print(last[-1], flush=True)
        return _poll(api, migration_id, plain, print)
    columns = (rp.SpinnerColumn(), rp.TextColumn("{task.fields[status]:<9}"), rp.BarColumn(),
               rp.TextColumn("{task.completed:.0f}/{task.total:.0f} MiB"),
               rp.TextColumn("iteration {task.fields[iteration]}"),
               rp.TextColumn("[dim]{task.fields[step]}"), rp.TimeElapsedColumn())
    with rp.Progress(*columns, console=console) as bar:
        task = bar.add_task("migrate", total=1, status="queued", step="-", iteration=0)

        def update(mig):
            done = mig["memory_processed_mb"]
            bar.update(task, completed=done, total=max(mig["memory_total_mb"], done, 1),
                       status=mig["status"], step=mig["current_step"] or "-",
                       iteration=mig["iteration"])
        return _poll(api, migration_id, update, bar.console.print)


def cmd_live_migrate(args, console, api):
    mig = api.live_migrate(args.instance, host=args.host,
                           block_migration=args.block_migration, wait=False)
    print(f"migration {mig['uuid']} accepted: instance {args.instance} from "
          f"{mig['source_host']} to {args.host or 'a host the scheduler chooses'}")
    watch(api, mig["uuid"], console)
    mig = api.wait(mig["uuid"])
    if mig["status"] == Status.COMPLETED:
        print(f"migration {mig['uuid']} completed: instance {mig['instance_uuid']} runs on "
              f"{mig['dest_host']} after {mig['iteration']} iterations, downtime "
              f"{mig['downtime_ms'] or 0:.1f} ms")
        return 0
    print(f"migration {mig['uuid']} {mig['status']}: {mig['error'] or 'no reason recorded'}",
          file=sys.stderr)
    return 1


# -- listings -------------------------------------------------------------------------------
def _text(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


def _short(text, width=60):
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(console, title, headers, rows):
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*[_text(cell) for cell in row])
    console.print(table)


def cmd_host_list(args, console, api):
    _table(console, "Hosts", ["name", "state", "hypervisor", "cpu model", "memory MiB used/total",
                              "disk GB used/total", "shared storage"],
           [(h["name"], ("up" if h["up"] and not h["forced_down"] else "down")
             + (", disabled" if h["disabled"] else ""),
             f"{h['hypervisor_type']} {scheduler.version_str(h['hypervisor_version'])}",
             h["cpu_model"],
             f"{h['memory_used_mb']}/{h['memory_mb']}", f"{h['disk_used_gb']}/{h['disk_gb']}",
             h["shared_storage"]) for h in api.list_hosts()])


def cmd_instance_list(args, console, api):
    _table(console, "Instances", ["uuid", "name", "host", "vm_state", "task_state",
                                  "power_state", "flavor", "memory MiB"],
           [(i["uuid"], i["name"], i["host"], i["vm_state"], i["task_state"],
             i["power_state"], i["flavor_name"], i["memory_mb"])
            for i in api.list_instances(host=args.host)])


def cmd_migration_list(args, console, api):
    if args.stuck:
        migrations = api.stuck_migrations()
        title = (f"Stuck migrations (transitional, untouched for more than "
                 f"{CONF.jobboard.stuck_after} s): {len(migrations)}")
    else:
        migrations = api.list_migrations(instance_id=args.instance, status=args.status)
        title = "Migrations"
    _table(console, title, ["uuid", "instance", "type", "status", "source → dest",
                            "current/failed step", "error"],
           [(m["uuid"], m["instance_uuid"], m["migration_type"], m["status"],
             f"{m['source_host']} → {m['dest_host'] or m['requested_dest'] or '?'}",
             m["current_step"] or (m["failed_step"] and f"failed: {m['failed_step']}"),
             _short(m["error"], 50) or None)
            for m in migrations])


def cmd_sweep(args, console, api):
    done = api.sweep()
    for migration_id, action in done:
        print(f"{migration_id}: {action}")
    print(f"{len(done)} stuck migration(s) handled")


def cmd_migration_resume(args, console, api):
    mig = api.resume(args.migration)
    print(f"migration {mig['uuid']} {mig['status']}"
          + (f": {mig['error']}" if mig["error"] else ""))
    return 0 if mig["status"] in cli_moves.SUCCESS | {Status.COMPLETED} else 1


def cmd_conductor(args, console, api):
    if args.workers:
        CONF.set_override("conductor_workers", args.workers, group="jobboard")
    try:
        return service.run_conductor()
    finally:
        if args.workers:
            CONF.clear_override("conductor_workers", group="jobboard")


def cmd_migration_show(args, console, api):
    mig = api.show_migration(args.migration)
    rows = []
    for key, value in mig.items():
        if key.endswith("_at") and value:
            value = datetime.datetime.fromtimestamp(value).isoformat(" ", "seconds")
        elif key == "scheduler_notes":
            value = "\n".join(f"{host}: {why}" for host, why in value.items()) or None
        rows.append((key, value))
    _table(console, f"Migration {mig['uuid']}", ["field", "value"], rows)
    steps = api.flow_steps(mig["uuid"])
    if not steps:
        print("flow steps: not available (no persisted flow details)")
        return
    _table(console, "Flow steps (in flow order)", ["step", "kind", "state", "failure"],
           [(s["name"], s["kind"], s["state"], _short(s["failure"], 70) if s["failure"] else None)
            for s in steps])


def cmd_operator_action(args, console, api):
    """migration-abort / migration-force-complete: ask the running flow."""
    action = api.abort if args.command == "migration-abort" else api.force_complete
    mig = action(args.migration)
    print(f"{args.command[len('migration-'):]} requested for migration {mig['uuid']} "
          f"(status {mig['status']})")


def cmd_demo(args, console, api):
    from migrateflow import demo  # demo imports this module
    return demo.run_demo(CONF.state_path, out=print)


def cmd_graph(args, console, api):
    sys.stdout.write(graph.render(args.operation, args.kind))


# -- argument parsing -------------------------------------------------------------------------
def build_parser():
    """Global options are accepted before or after the subcommand; their
    SUPPRESS defaults keep an absent one from hiding one given before."""
    common = argparse.ArgumentParser(add_help=False)
    opt = common.add_argument
    opt("--config-file", action="append", metavar="PATH", default=argparse.SUPPRESS,
        help="oslo.config file (repeatable)")
    opt("--database-connection", metavar="URL", default=argparse.SUPPRESS,
        help="shorthand for [database] connection")
    opt("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
        help="sets [DEFAULT] state_path (default ./migrateflow-state)")
    opt("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    opt("--debug", action="store_true", default=argparse.SUPPRESS)
    opt("--as-user", metavar="USER", default=argparse.SUPPRESS,
        help="act as this user (with --as-project; default: the administrator)")
    opt("--as-project", metavar="PROJECT", default=argparse.SUPPRESS,
        help="the project of --as-user")
    opt("--as-role", metavar="ROLE", action="append", default=argparse.SUPPRESS,
        help="a role of --as-user (repeatable; default: member)")
    parser = argparse.ArgumentParser(prog="migrateflow", parents=[common],
                                     description="Move virtual machines between hosts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, text, *positional):
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        cmd.set_defaults(func=func)
        for metavar in positional:
            cmd.add_argument(metavar.lower(), metavar=metavar)
        return cmd

    add("demo", cmd_demo, "build a small fake cloud and run live migrations in it")
    cmd = add("live-migrate", cmd_live_migrate, "live-migrate an instance, show progress",
              "INSTANCE")
    cmd.add_argument("--host", help="destination (default: the scheduler chooses)")
    block = cmd.add_mutually_exclusive_group()
    block.add_argument("--block-migrate", dest="block_migration", action="store_const",
                       const=True, help="copy the local disks too")
    block.add_argument("--no-block-migrate", dest="block_migration", action="store_const",
                       const=False, help="shared storage or volume-backed only")
    cmd = add("migration-list", cmd_migration_list, "list migrations")
    cmd.add_argument("--instance")
    cmd.add_argument("--status", choices=[s.value for s in Status]
                     + [s.value for s in MoveStatus if s.value not in set(Status)])
    cmd.add_argument("--stuck", action="store_true",
                     help="only migrations nobody is moving (expected: none)")
    add("migration-resume", cmd_migration_resume,
        "continue an interrupted migration from its last finished step", "ID")
    add("sweep", cmd_sweep, "resume or finish every stuck migration now")
    cmd = add("conductor", cmd_conductor,
              "claim and run migration jobs from the ZooKeeper jobboard until SIGTERM")
    cmd.add_argument("--workers", type=int, help="jobs run at once ([jobboard] "
                     "conductor_workers)")
    add("migration-show", cmd_migration_show, "show a migration and its flow's steps", "ID")
    add("migration-abort", cmd_operator_action, "abort a running migration", "ID")
    add("migration-force-complete", cmd_operator_action, "finish a running migration now", "ID")
    add("host-list", cmd_host_list, "list compute hosts")
    add("instance-list", cmd_instance_list, "list instances").add_argument("--host")
    cli_moves.register(add)
    cmd = add("graph", cmd_graph, "print PlantUML of an operation's flow")
    cmd.add_argument("operation", choices=sorted(graph.OPERATIONS))
    cmd.add_argument("--kind", choices=graph.KINDS, default="activity")
    return parser


def _caller(args):
    """The request context the command acts in: the administrator's
    unless --as-user / --as-project name another caller."""
    user, project = getattr(args, "as_user", None), getattr(args, "as_project", None)
    roles = getattr(args, "as_role", None)
    if user is None and project is None:
        if roles:
            raise exc.InvalidRequest("--as-role needs --as-user and --as-project")
        return None
    if user is None or project is None:
        raise exc.InvalidRequest("--as-user and --as-project go together")
    ctx = context_mod.make_context(user, project, roles or ["member"])
    LOG.info("acting as user=%s project=%s roles=%s request=%s", ctx.user_id,
             ctx.project_id, ",".join(ctx.roles), ctx.request_id)
    return ctx


def main(argv=None):
    """Run one command; returns the exit status (0 ok, 1 failed, 2 refused)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as stop:  # --help, or a usage error argparse already printed
        return stop.code
    args.verbose, args.debug = (getattr(args, f, False) for f in ("verbose", "debug"))
    args.migration = getattr(args, "id", None)
    overrides = {}
    if getattr(args, "database_connection", None):
        overrides[("connection", "database")] = args.database_connection
    if getattr(args, "state_dir", None):
        overrides[("state_path", None)] = args.state_dir
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200  # pipes and captures: do not fold uuids
    try:
        CONF(args=[], project="migrateflow",
             default_config_files=getattr(args, "config_file", None))
        with _logging(args), config_overrides(overrides):
            LOG.info("state database: %s", masked_url(CONF.database.connection)
                     if CONF.database.connection else f"SQLite under {CONF.state_path}")
            return args.func(args, console, api_mod.MigrationAPI(context=_caller(args))) or 0
    except exc.MigrateflowError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except cfg.Error as err:
        print(f"error: configuration: {err}", file=sys.stderr)
        return 2
    except (db_exc.DBError, sa.exc.SQLAlchemyError, ModuleNotFoundError) as err:
        url = overrides.get(("connection", "database")) or CONF.database.connection or ""
        print(f"error: state database {masked_url(url)}: {type(err).__name__}: "
              f"{scrub(str(err).splitlines()[0] if str(err) else '')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
