"""Who may do what: oslo.policy rules with their defaults in code.

Moving instances between hosts is an administrator's operation (the design
documents: ``authorize(context, 'migrateLive')``, migrate only in the admin
menu); resizing, confirming and reverting a resize are also open to the
instance's own project.  Every default can be overridden by the policy file
(``[oslo_policy] policy_file``, YAML or JSON); ``oslopolicy-sample-generator
--namespace migrateflow`` prints the defaults as a sample file and
``oslopolicy-policy-generator --namespace migrateflow`` the effective rules.

A refused call raises ``exceptions.Forbidden`` naming the rule, before
anything changed.
"""
import threading

from oslo_config import cfg
from oslo_policy import policy

from migrateflow import exceptions as exc

ADMIN = "rule:admin_api"
ADMIN_OR_OWNER = "rule:admin_or_owner"

LIVE_MIGRATE = "migrateflow:live_migrate"
MIGRATE = "migrateflow:migrate"
RESIZE = "migrateflow:resize"
CONFIRM_RESIZE = "migrateflow:confirm_resize"
REVERT_RESIZE = "migrateflow:revert_resize"
EVACUATE = "migrateflow:evacuate"
ABORT = "migrateflow:migration:abort"
FORCE_COMPLETE = "migrateflow:migration:force_complete"
RESUME = "migrateflow:migration:resume"
SHOW_MIGRATION = "migrateflow:migration:show"
LIST_MIGRATIONS = "migrateflow:migration:list"
HOST_DRAIN = "migrateflow:host:drain"
HOST_EVACUATE = "migrateflow:host:evacuate"
HOST_UPDATE = "migrateflow:host:update"
HOST_LIST = "migrateflow:host:list"
INSTANCE_LIST = "migrateflow:instance:list"
FLAVOR_CREATE = "migrateflow:flavor:create"
QUOTA_UPDATE = "migrateflow:quota:update"


def _rule(name, check, description, call, command):
    """A documented rule; its "operations" are the Python API call and the
    CLI command it guards (this is a library, not a REST service)."""
    return policy.DocumentedRuleDefault(
        name=name, check_str=check, description=description,
        operations=[{"method": "API", "path": f"MigrationAPI.{call}"},
                    {"method": "CLI", "path": f"migrateflow {command}"}])


BASE_RULES = [
    policy.RuleDefault("admin_api", "role:admin",
                       description="An administrator of the cloud."),
    policy.RuleDefault("admin_or_owner", "rule:admin_api or project_id:%(project_id)s",
                       description="An administrator, or a member of the project that "
                                   "owns the instance."),
]

RULES = BASE_RULES + [
    _rule(LIVE_MIGRATE, ADMIN, "Live-migrate an instance to another host.",
          "live_migrate()", "live-migrate"),
    _rule(MIGRATE, ADMIN, "Cold-migrate an instance to another host.",
          "migrate()", "migrate"),
    _rule(RESIZE, ADMIN_OR_OWNER, "Resize an instance to another flavor.",
          "resize()", "resize"),
    _rule(CONFIRM_RESIZE, ADMIN_OR_OWNER, "Confirm a finished resize or cold migration.",
          "confirm_resize()", "resize-confirm"),
    _rule(REVERT_RESIZE, ADMIN_OR_OWNER, "Revert a finished resize or cold migration.",
          "revert_resize()", "resize-revert"),
    _rule(EVACUATE, ADMIN, "Evacuate an instance off a host that is down.",
          "evacuate()", "evacuate"),
    _rule(ABORT, ADMIN, "Abort a live migration in progress.",
          "abort()", "migration-abort"),
    _rule(FORCE_COMPLETE, ADMIN, "Force a running live migration to complete.",
          "force_complete()", "migration-force-complete"),
    _rule(RESUME, ADMIN, "Resume an interrupted migration, or every stuck one.",
          "resume(), sweep()", "migration-resume, sweep"),
    _rule(SHOW_MIGRATION, ADMIN_OR_OWNER, "Show a migration and its steps.",
          "show_migration(), flow_steps()", "migration-show"),
    _rule(LIST_MIGRATIONS, ADMIN, "List migrations.",
          "list_migrations(), stuck_migrations()", "migration-list"),
    _rule(HOST_DRAIN, ADMIN, "Disable a host and live-migrate every instance off it.",
          "drain_host()", "host-drain"),
    _rule(HOST_EVACUATE, ADMIN, "Evacuate every instance of a host that is down.",
          "evacuate_host()", "host-evacuate"),
    _rule(HOST_UPDATE, ADMIN, "Change a host's state (up, forced down, disabled) or "
          "report it started again.", "set_host_state(), host_started()",
          "host-set, host-started"),
    _rule(HOST_LIST, ADMIN, "List compute hosts.", "list_hosts()", "host-list"),
    _rule(INSTANCE_LIST, ADMIN, "List instances of every project.",
          "list_instances()", "instance-list"),
    _rule(FLAVOR_CREATE, ADMIN, "Define a flavor.", "create_flavor()", "flavor-create"),
    _rule(QUOTA_UPDATE, ADMIN, "Set a project's quota limit.", "set_quota()", "quota-set"),
]


def list_rules():
    """The rules and their defaults (entry point ``oslo.policy.policies``)."""
    return RULES


_enforcers = {}
_lock = threading.Lock()


def get_enforcer(conf=None):
    """The enforcer of ``conf`` with the defaults registered (entry point
    ``oslo.policy.enforcer``; the generators call it without arguments)."""
    if conf is None:
        from migrateflow.conf import CONF as conf
    key = (id(conf), _parsed(conf))
    with _lock:
        enforcer = _enforcers.get(key)
        if enforcer is None:
            # a configuration never parsed (an embedding program that only
            # sets overrides) has no files to look in: the defaults apply
            enforcer = policy.Enforcer(conf, use_conf=key[1])
            enforcer.register_defaults(RULES)
            if not key[1]:
                enforcer.set_rules(policy.Rules({r.name: r.check for r in RULES}),
                                   use_conf=False)
            _enforcers[key] = enforcer
        return enforcer


def _parsed(conf):
    try:
        conf.find_file("policy.yaml")
    except cfg.NotInitializedError:
        return False
    return True


def reset():
    """Forget the enforcers (tests point ``[oslo_policy]`` elsewhere); the
    policy file is read again at the next check."""
    with _lock:
        for enforcer in _enforcers.values():
            enforcer.clear()
        _enforcers.clear()


def authorize(ctx, rule, target=None, conf=None):
    """Raise ``Forbidden`` naming ``rule`` unless ``ctx`` may do it on
    ``target`` ({project_id: the instance's project} for owner rules)."""
    enforcer = get_enforcer(conf)
    if not enforcer.authorize(rule, dict(target or {}), ctx, do_raise=False):
        raise exc.Forbidden(
            f"policy {rule} does not allow user {ctx.user_id!r} of project "
            f"{ctx.project_id!r} (roles: {', '.join(ctx.roles) or 'none'}) to do this")
