"""``migrateflow`` commands for cold migration, resize, confirm/revert,
evacuation and whole-host operations, plus the flavors, quotas and host
states they need (registered by ``cli.build_parser``)."""
import sys
import time

from rich import progress as rp

from migrateflow.states import FLOW_ENDED, MoveStatus

POLL_SECONDS = 0.1
#: what a successful end is for each kind of request
SUCCESS = {MoveStatus.FINISHED, MoveStatus.CONFIRMED, MoveStatus.REVERTED,
            MoveStatus.DONE, MoveStatus.COMPLETED}


def watch_steps(api, migration_id, console):
    """Print each status / step change until the flow ends (a spinner on a
    terminal)."""
    seen = None
    with console.status("waiting", spinner="dots") if console.is_terminal else _nothing():
        while True:
            mig = api.show_migration(migration_id)
            line = f"{mig['status']:<14} step={mig['current_step'] or '-'}"
            if line != seen:
                seen = line
                console.print(line) if console.is_terminal else print(line, flush=True)
            if mig["status"] in FLOW_ENDED:
                return api.wait(migration_id)
            time.sleep(POLL_SECONDS)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def _report(mig, what):
    if mig["status"] in SUCCESS:
        where = mig["dest_host"] if mig["status"] != MoveStatus.REVERTED else mig["source_host"]
        print(f"migration {mig['uuid']} {mig['status']}: instance {mig['instance_uuid']} "
              f"on {where}" + (f" (confirm or revert it: {what})"
                               if mig["status"] == MoveStatus.FINISHED else ""))
        return 0
    print(f"migration {mig['uuid']} {mig['status']}: {mig['error'] or 'no reason recorded'}",
          file=sys.stderr)
    return 1


def cmd_migrate(args, console, api):
    if args.command == "resize":
        mig = api.resize(args.instance, args.flavor, host=args.host, wait=False)
    else:
        mig = api.migrate(args.instance, host=args.host, wait=False)
    print(f"migration {mig['uuid']} accepted: {mig['migration_type']} of instance "
          f"{args.instance} from {mig['source_host']} to "
          f"{args.host or 'a host the scheduler chooses'}")
    return _report(watch_steps(api, mig["uuid"], console),
                   f"migrateflow resize-confirm {mig['uuid']}")


def cmd_confirm_revert(args, console, api):
    call = api.confirm_resize if args.command == "resize-confirm" else api.revert_resize
    mig = call(args.migration, wait=False)
    print(f"migration {mig['uuid']} {mig['status']}")
    return _report(watch_steps(api, mig["uuid"], console), "")


def cmd_auto_confirm(args, console, api):
    done = api.confirm_expired_resizes()
    for migration_id, outcome in done:
        print(f"{migration_id}: {outcome}")
    print(f"{len(done)} resize(s) past the confirm window handled")
    return 0 if all(outcome == MoveStatus.CONFIRMED for _m, outcome in done) else 1


def cmd_evacuate(args, console, api):
    mig = api.evacuate(args.instance, host=args.host, wait=False)
    print(f"evacuation {mig['uuid']} accepted: instance {args.instance} off "
          f"{mig['source_host']}")
    return _report(watch_steps(api, mig["uuid"], console), "")


def _host_progress(console, total_hint, what):
    """(progress callback, context manager) showing per-instance results."""
    if not console.is_terminal:
        def plain(done, total, result):
            print(f"[{done}/{total}] {result.get('name') or result['instance']}: "
                  f"{result['status']}" + (f" ({result['error']})" if result.get("error")
                                           else ""), flush=True)
        return plain, _nothing()
    bar = rp.Progress(rp.TextColumn(what), rp.BarColumn(), rp.MofNCompleteColumn(),
                      rp.TimeElapsedColumn(), console=console)
    task = bar.add_task(what, total=total_hint or None)

    def update(done, total, result):
        bar.update(task, completed=done, total=total)
        if result.get("error"):
            bar.console.print(f"{result.get('name') or result['instance']}: "
                              f"{result['status']} ({result['error']})")
    return update, bar


def _host_summary(report):
    print(f"host {report['host']}: {report['succeeded']} of {report['total']} instance(s) "
          f"moved, {report['failed']} failed")
    return 0 if not report["failed"] else 1


def cmd_host_drain(args, console, api):
    total = len(api.list_instances(host=args.host))
    progress, shown = _host_progress(console, total, f"draining {args.host}")
    with shown:
        report = api.drain_host(args.host, cold_fallback=args.cold_fallback,
                                per_host_limit=args.max_concurrent, progress=progress)
    return _host_summary(report)


def cmd_host_evacuate(args, console, api):
    total = len(api.list_instances(host=args.host))
    progress, shown = _host_progress(console, total, f"evacuating {args.host}")
    with shown:
        report = api.evacuate_host(args.host, recovery_method=args.recovery_method,
                                   reserved_hosts=args.reserved_host or (),
                                   progress=progress)
    return _host_summary(report)


def cmd_host_started(args, console, api):
    report = api.host_started(args.host)
    for entry in report:
        why = entry["reason"] or entry["error"]
        print(f"{entry['name']} ({entry['instance']}): {entry['action']}"
              + (f" - {why}" if why else ""))
    print(f"host {args.host} started: {len(report)} instance(s) handled")
    return 1 if any(entry["action"] == "failed" for entry in report) else 0


def cmd_host_set(args, console, api):
    values = {}
    if args.state is not None:
        values["up"] = args.state == "up"
    if args.forced_down is not None:
        values["forced_down"] = args.forced_down
    if args.disable is not None:
        values.update(disabled=True, disabled_reason=args.disable)
    if args.enable:
        values.update(disabled=False, disabled_reason=None)
    if not values:
        print("error: nothing to change (see --help)", file=sys.stderr)
        return 2
    api.set_host_state(args.host, **values)
    print(f"host {args.host}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def cmd_flavor_create(args, console, api):
    flavor = api.create_flavor(args.name, memory_mb=args.memory_mb, vcpus=args.vcpus,
                               disk_gb=args.disk_gb)
    print(f"flavor {flavor['name']}: {flavor['memory_mb']} MiB, {flavor['vcpus']} vCPUs, "
          f"{flavor['disk_gb']} GB")


def cmd_flavor_list(args, console, api):
    for f in api.list_flavors():
        print(f"{f['name']}\t{f['memory_mb']} MiB\t{f['vcpus']} vCPUs\t{f['disk_gb']} GB")


def cmd_quota_set(args, console, api):
    api.set_quota(args.project, args.resource, args.limit)
    print(f"project {args.project}: {args.resource} limit "
          f"{args.limit if args.limit is not None else 'removed'}")


def register(add):
    """Add the commands through ``add(name, func, help, *positional)``."""
    cmd = add("migrate", cmd_migrate, "cold-migrate an instance (keeps its flavor)",
              "INSTANCE")
    cmd.add_argument("--host", help="destination (default: the scheduler chooses)")
    cmd = add("resize", cmd_migrate, "resize an instance to another flavor",
              "INSTANCE", "FLAVOR")
    cmd.add_argument("--host", help="destination (default: the scheduler chooses)")
    add("resize-confirm", cmd_confirm_revert, "confirm a finished resize or cold migration",
        "ID")
    add("resize-revert", cmd_confirm_revert, "revert a finished resize or cold migration",
        "ID")
    add("resize-auto-confirm", cmd_auto_confirm,
        "confirm every resize finished longer than resize_confirm_window ago")
    cmd = add("evacuate", cmd_evacuate, "rebuild an instance of a down host elsewhere",
              "INSTANCE")
    cmd.add_argument("--host", help="destination (default: the scheduler chooses)")
    cmd = add("host-drain", cmd_host_drain,
              "disable a host and live-migrate every instance off it", "HOST")
    cmd.add_argument("--cold-fallback", action="store_true",
                     help="cold-migrate (and confirm) what cannot move live")
    cmd.add_argument("--max-concurrent", type=int, default=None,
                     help="live migrations at once (default max_concurrent_live_migrations)")
    cmd = add("host-evacuate", cmd_host_evacuate, "evacuate every instance of a down host",
              "HOST")
    cmd.add_argument("--recovery-method", default="auto",
                     choices=["auto", "reserved_host", "rh_priority"])
    cmd.add_argument("--reserved-host", action="append", metavar="HOST",
                     help="a reserved host (repeatable)")
    add("host-started", cmd_host_started,
        "a host is back: destroy what was evacuated off it, start the rest", "HOST")
    cmd = add("host-set", cmd_host_set, "mark a host up/down, forced down, (dis)abled",
              "HOST")
    cmd.add_argument("--state", choices=["up", "down"])
    forced = cmd.add_mutually_exclusive_group()
    forced.add_argument("--forced-down", dest="forced_down", action="store_const",
                        const=True, default=None, help="fence: force the host down")
    forced.add_argument("--no-forced-down", dest="forced_down", action="store_const",
                        const=False)
    able = cmd.add_mutually_exclusive_group()
    able.add_argument("--disable", metavar="REASON")
    able.add_argument("--enable", action="store_true")
    cmd = add("flavor-create", cmd_flavor_create, "define a flavor", "NAME")
    cmd.add_argument("--memory-mb", type=int, required=True)
    cmd.add_argument("--vcpus", type=int, required=True)
    cmd.add_argument("--disk-gb", type=int, required=True)
    add("flavor-list", cmd_flavor_list, "list flavors")
    cmd = add("quota-set", cmd_quota_set, "set a project's limit", "PROJECT")
    cmd.add_argument("resource", choices=["cores", "ram_mb", "instances"])
    cmd.add_argument("limit", type=int, nargs="?", help="omit to remove the limit")
