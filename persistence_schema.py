"""The flow persistence's tables and statements (``persistence``): each
logbook, flow and atom detail is stored as the JSON of its ``to_dict()``
beside a few indexed columns; the statements are built once."""
import datetime
import json

import sqlalchemy as sa
from oslo_serialization import jsonutils
from sqlalchemy import bindparam as _bp
from sqlalchemy.dialects import mysql
from taskflow.persistence import models
from taskflow.types import failure as ft

_JSON = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
METADATA = sa.MetaData()


def _table(name, parent, *columns):
    if parent:  # children are deleted explicitly too (SQLite FKs may be off)
        columns = (sa.Column("parent_uuid", sa.String(64), sa.ForeignKey(
            parent + ".uuid", ondelete="CASCADE"), index=True),) + columns
    return sa.Table(
        name, METADATA, sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255)), *columns,
        sa.Column("updated_at", sa.DateTime),
        sa.Column("data", _JSON, nullable=False))


LOGBOOKS = LB = _table("tf_logbooks", None)
FLOWDETAILS = FD = _table("tf_flowdetails", "tf_logbooks",
                          sa.Column("state", sa.String(255), index=True))
ATOMDETAILS = AD = _table(
    "tf_atomdetails", "tf_flowdetails", sa.Column("state", sa.String(255)),
    sa.Column("atom_type", sa.String(32), nullable=False))

INS_LB, INS_FD, INS_AD = sa.insert(LB), sa.insert(FD), sa.insert(AD)
_SET = dict(data=_bp("data"), updated_at=_bp("updated_at"))
UPD_LB = sa.update(LB).where(LB.c.uuid == _bp("b_uuid")).values(**_SET)
UPD_FD = sa.update(FD).where(FD.c.uuid == _bp("b_uuid")).values(
    state=_bp("state"), **_SET)
UPD_AD = sa.update(AD).where(
    AD.c.uuid == _bp("b_uuid"), AD.c.atom_type == _bp("b_type")).values(
    state=_bp("state"), **_SET)
SEL_LB = sa.select(LB.c.data).where(LB.c.uuid == _bp("u"))
_FD_COLS = (FD.c.parent_uuid, FD.c.data)
SEL_FDS = sa.select(*_FD_COLS)
SEL_FD = sa.select(*_FD_COLS).where(FD.c.uuid == _bp("u"))
SEL_FD_BY_LB = sa.select(*_FD_COLS).where(FD.c.parent_uuid == _bp("u"))
_AD_COLS = (AD.c.uuid, AD.c.parent_uuid, AD.c.atom_type, AD.c.data)
SEL_ADS = sa.select(*_AD_COLS)
SEL_AD = sa.select(*_AD_COLS).where(AD.c.uuid == _bp("u"))
SEL_AD_BY_FD = sa.select(*_AD_COLS).where(AD.c.parent_uuid == _bp("u"))
SEL_AD_BY_LB = sa.select(*_AD_COLS).join(
    FD, FD.c.uuid == AD.c.parent_uuid).where(FD.c.parent_uuid == _bp("u"))
_FD_OF_LB = sa.select(FD.c.uuid).where(FD.c.parent_uuid == _bp("u"))
DEL_BOOK = (sa.delete(AD).where(AD.c.parent_uuid.in_(_FD_OF_LB)),
            sa.delete(FD).where(FD.c.parent_uuid == _bp("u")),
            sa.delete(LB).where(LB.c.uuid == _bp("u")))

encode = json.JSONEncoder(default=jsonutils.to_primitive,
                          separators=(",", ":")).encode


def create_schema(engine):
    """Create the ``tf_*`` tables (tests, benchmarks; production uses alembic)."""
    METADATA.create_all(engine)


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def atom_from(atom_type, data):
    data = json.loads(data)
    if atom_type != "RETRY_DETAIL":
        return models.atom_detail_class(atom_type).from_dict(data)
    # RetryDetail.from_dict (taskflow 6.5) replaces the value of each result
    # that has failures by a failure dict (its inner loop reuses ``data``)
    results = data.pop("results", None) or ()
    ad = models.RetryDetail.from_dict(data)
    ad.results = [(value, {k: ft.Failure.from_dict(f) for k, f in
                           failures.items()}) for value, failures in results]
    return ad


def book_from(data):
    return models.LogBook.from_dict(json.loads(data), unmarshal_time=True)

