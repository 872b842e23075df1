"""Helpers shared by the state-database modules."""
import time

from oslo_db import api as oslo_db_api
from sqlalchemy import exc as sa_exc


def lost_connection(err):
    """A connection lost inside a transaction, as a listener of the ending
    transaction meets it (SQLAlchemy refuses the invalidated connection
    until rolled back; the connection error it follows is then lost)."""
    return isinstance(err, sa_exc.PendingRollbackError)


#: every public database function retries on deadlocks and lost connections
retry = oslo_db_api.wrap_db_retry(max_retries=5, retry_interval=0.2,
                                  inc_retry_interval=True, retry_on_deadlock=True,
                                  retry_on_disconnect=True,
                                  exception_checker=lost_connection)


def now():
    return time.time()


def row(result_row):
    return dict(result_row._mapping) if result_row is not None else None


def raw_update(table, key_column, key, values, column=None, among=()):
    """(SQLite's UPDATE ``table`` SET ``values`` WHERE ``key_column`` =
    ``key`` [AND ``column`` IN ``among``], its parameters)."""
    sql = (f"UPDATE {table} SET {', '.join(f'{name} = ?' for name in values)} "
           f"WHERE {key_column} = ?")
    params = [*values.values(), key]
    if column is not None:
        sql += f" AND {column} IN ({', '.join('?' * len(among))})"
        params += among
    return sql, params
