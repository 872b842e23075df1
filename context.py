"""Who asks: the request context of every public operation, and the log
fields that follow it.

A ``RequestContext`` is oslo.context's (user, project, roles, request id),
the form the rest of an OpenStack-style cloud passes around.  It travels
into a flow's store as plain data (``to_store``), so a flow resumed by
another process still knows who asked and under which request id.

Log lines carry ``request_id`` and ``migration_id``: ``bind`` sets them
for the current thread (the API binds the request while it validates and
launches; a flow's listener binds both while the flow's steps run), and
``ContextFilter`` puts them on every record a handler emits, with anything
that looks like a password or token masked.
"""
import contextlib
import contextvars
import logging
import re

from oslo_context import context as oslo_context
from oslo_utils import strutils

from migrateflow import exceptions as exc

#: the role that makes a caller an administrator (policy's ``role:admin``)
ADMIN_ROLE = "admin"
#: the context the embedding controller acts in when it names no caller
#: (and the CLI's default): the cloud's administrator
ADMIN_USER = ADMIN_PROJECT = "admin"


class RequestContext(oslo_context.RequestContext):
    """A caller: ``user_id``, ``project_id``, ``roles``, ``request_id``
    (``req-<uuid>``, generated when not given)."""

    def to_store(self):
        """The plain dict a flow's store keeps (no secrets: no token)."""
        return {"user_id": self.user_id, "project_id": self.project_id,
                "roles": list(self.roles), "request_id": self.request_id,
                "global_request_id": self.global_request_id}

    @classmethod
    def from_store(cls, data):
        """The context ``to_store`` saved (None for a flow saved before
        contexts were stored: treated as the administrator's)."""
        if not data:
            return admin_context()
        return cls(user_id=data.get("user_id"), project_id=data.get("project_id"),
                   roles=list(data.get("roles") or ()), request_id=data.get("request_id"),
                   global_request_id=data.get("global_request_id"),
                   is_admin=ADMIN_ROLE in (data.get("roles") or ()))


def make_context(user_id, project_id, roles=(), request_id=None):
    """A caller's context; names are checked (a missing user or project is
    a clear error, not an anonymous caller)."""
    for what, value in (("user", user_id), ("project", project_id)):
        if not isinstance(value, str) or not value.strip():
            raise exc.InvalidRequest(f"a request context needs a {what} id, not {value!r}")
    roles = [roles] if isinstance(roles, str) else list(roles or ())
    if any(not isinstance(role, str) or not role.strip() for role in roles):
        raise exc.InvalidRequest(f"malformed roles {roles!r}")
    kwargs = {"request_id": request_id} if request_id else {}
    return RequestContext(user_id=user_id, project_id=project_id, roles=roles,
                          is_admin=ADMIN_ROLE in roles, **kwargs)


def admin_context(request_id=None):
    """The cloud administrator (a fresh request id each call)."""
    return make_context(ADMIN_USER, ADMIN_PROJECT, [ADMIN_ROLE], request_id)


def ensure(ctx):
    """``ctx``, or the administrator's context when None; anything else is
    refused (a context is an object, never a user name)."""
    if ctx is None:
        return admin_context()
    if not isinstance(ctx, oslo_context.RequestContext):
        raise exc.InvalidRequest(f"not a request context: {type(ctx).__name__}")
    return ctx


# -- log fields ----------------------------------------------------------------------
_fields = contextvars.ContextVar("migrateflow_log_fields", default={})


@contextlib.contextmanager
def bind(**fields):
    """Add ``fields`` (request_id, migration_id) to this thread's log
    records for the block."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _fields.reset(token)


def current(name):
    """The bound value of a log field (None when unbound)."""
    return _fields.get().get(name)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def mask(text):
    """``text`` with passwords and tokens replaced by ***: key=value and
    JSON pairs (oslo.utils' rules) and the password of a URL."""
    return strutils.mask_password(_URL_PASSWORD.sub(r"\1***@", text))


_traceback = logging.Formatter()


class ContextFilter(logging.Filter):
    """On a handler: every record gets ``request_id`` and ``migration_id``
    ("-" when unbound), and its message, traceback and stack masked of
    passwords and tokens (an exception's text often quotes a URL)."""

    def filter(self, record):
        fields = _fields.get()
        record.request_id = fields.get("request_id", "-")
        record.migration_id = fields.get("migration_id", "-")
        message = record.getMessage()
        masked = mask(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # formatters use exc_text when set
            record.exc_text = _traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True


#: the format of log lines that name the request and migration
LOG_FORMAT = ("%(asctime)s %(levelname)s %(name)s [request=%(request_id)s "
              "migration=%(migration_id)s] %(message)s")
