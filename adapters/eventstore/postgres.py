"""PostgreSQL event store: eventsourcing's recorder plus request-id claims, an append-only guard and a
hash chain.

Imports: eventsourcing, psycopg, domain. Select it with
PERSISTENCE_MODULE="adapters.eventstore.postgres:ClaimingPostgresFactory". Creating the tables also
installs triggers that make the database itself refuse UPDATE, DELETE and TRUNCATE on the stored
events and on the claims, so history can only grow, and one that chains every inserted event to the
one before it (`domain.audit.link`, computed in SQL: the recorder's table lock already serialises
inserts in position order, so the previous digest is always the last row of the chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore, PostgresFactory
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composed, Identifier, Literal

from domain.claims import CLAIMS_KWARG

CLAIMS_TABLE = "usage_request_claims"
GUARD_FUNCTION = "lwapi_refuse_history_change"
LINK_FUNCTION = "lwapi_chain_link"
CHAIN_FUNCTION = "lwapi_chain_event"


def chain_table_name(events_table: str) -> str:
    return f"{events_table}_chain"


def chain_statements(schema: str, events_table: str) -> list[Composed]:
    """The chain table, the digest function, the trigger that fills the table, and a one-time backfill.

    An existing log (from before the chain) is chained once, when the chain table is first created, under
    the events table's lock; afterwards only the trigger writes it, so an event written with the trigger
    disabled stays visibly unchained instead of being blessed by a later backfill.
    """
    chain = chain_table_name(events_table)
    fmt = {"schema": Identifier(schema), "events": Identifier(events_table), "chain": Identifier(chain),
           "link": Identifier(LINK_FUNCTION), "chain_fn": Identifier(CHAIN_FUNCTION),
           "qualified_chain": Literal(f'"{schema}"."{chain}"'),
           "qualified_events": Literal(f'"{schema}"."{events_table}"'),
           "trigger": Identifier(f"{events_table}_chained"), "trigger_name": Literal(f"{events_table}_chained")}
    return [
        SQL("CREATE OR REPLACE FUNCTION {schema}.{link}(prior bytea, pos bigint, originator uuid, "
            "version bigint, topic text, state bytea) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $f$ "
            "SELECT sha256(prior || int8send(pos) || uuid_send(originator) || int8send(version) "
            "|| int4send(octet_length(convert_to(coalesce(topic, ''), 'UTF8'))) "
            "|| convert_to(coalesce(topic, ''), 'UTF8') "
            "|| int4send(octet_length(coalesce(state, ''::bytea))) || coalesce(state, ''::bytea)) $f$").format(**fmt),
        SQL("CREATE OR REPLACE FUNCTION {schema}.{chain_fn}() RETURNS trigger LANGUAGE plpgsql AS $f$ "
            "DECLARE previous bytea; BEGIN "
            "SELECT digest INTO previous FROM {schema}.{chain} ORDER BY notification_id DESC LIMIT 1; "
            "INSERT INTO {schema}.{chain} (notification_id, digest) VALUES (NEW.notification_id, "
            "{schema}.{link}(coalesce(previous, decode(repeat('00', 32), 'hex')), NEW.notification_id, "
            "NEW.originator_id, NEW.originator_version, NEW.topic, NEW.state)); "
            "RETURN NULL; END $f$").format(**fmt),
        SQL("DO $do$ DECLARE r record; previous bytea := decode(repeat('00', 32), 'hex'); BEGIN "
            "IF to_regclass({qualified_chain}) IS NULL THEN "
            "CREATE TABLE {schema}.{chain} (notification_id bigint PRIMARY KEY, digest bytea NOT NULL); "
            "LOCK TABLE {schema}.{events} IN EXCLUSIVE MODE; "
            "FOR r IN SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {schema}.{events} ORDER BY notification_id LOOP "
            "previous := {schema}.{link}(previous, r.notification_id, r.originator_id, r.originator_version, "
            "r.topic, r.state); "
            "INSERT INTO {schema}.{chain} VALUES (r.notification_id, previous); END LOOP; END IF; "
            "IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = {qualified_events}::regclass "
            "AND tgname = {trigger_name}) THEN CREATE TRIGGER {trigger} AFTER INSERT ON {schema}.{events} "
            "FOR EACH ROW EXECUTE FUNCTION {schema}.{chain_fn}(); END IF; END $do$").format(**fmt),
        *append_only_statements(schema, chain),
    ]


def append_only_statements(schema: str, table: str) -> list[Composed]:
    """Triggers refusing row changes and truncation; lifting them takes a deliberate ALTER TABLE.

    Each trigger is created only when missing: re-creating one locks its table, and a process opening
    the store while another is appending would deadlock with it.
    """
    fmt = {"schema": Identifier(schema), "table": Identifier(table), "fn": Identifier(GUARD_FUNCTION),
           "qualified": Literal(f'"{schema}"."{table}"')}
    triggers = [
        (f"{table}_append_only", SQL("BEFORE UPDATE OR DELETE ON {schema}.{table} FOR EACH ROW").format(**fmt)),
        (f"{table}_no_truncate", SQL("BEFORE TRUNCATE ON {schema}.{table} FOR EACH STATEMENT").format(**fmt)),
    ]
    return [
        SQL("DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = {qualified}::regclass "
            "AND tgname = {name}) THEN CREATE TRIGGER {trigger} {when} EXECUTE FUNCTION {schema}.{fn}(); "
            "END IF; END $do$").format(name=Literal(name), trigger=Identifier(name), when=when, **fmt)
        for name, when in triggers
    ]


class ClaimingPostgresApplicationRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        self.claims_table = Identifier(CLAIMS_TABLE)
        self.sql_create_statements += [
            SQL("CREATE TABLE IF NOT EXISTS {0}.{1} (request_id text PRIMARY KEY)").format(
                schema, self.claims_table),
            SQL("CREATE OR REPLACE FUNCTION {0}.{1}() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
                "RAISE EXCEPTION 'history is append-only: % on % refused', TG_OP, TG_TABLE_NAME "
                "USING ERRCODE = 'insufficient_privilege'; END $f$").format(
                schema, Identifier(GUARD_FUNCTION)),
            *append_only_statements(self.datastore.schema, self.events_table_name),
            *append_only_statements(self.datastore.schema, CLAIMS_TABLE),
            *chain_statements(self.datastore.schema, self.events_table_name),
        ]
        self._insert_claims = SQL("INSERT INTO {0}.{1} (request_id) SELECT unnest(%s::text[])").format(
            schema, self.claims_table)
        self._select_claims = SQL("SELECT request_id FROM {0}.{1} WHERE request_id = ANY(%s)").format(
            schema, self.claims_table)

    def _create_table(self, curs: Cursor[DictRow]) -> None:
        # CREATE OR REPLACE of the guard function and triggers deadlocks when two processes open the
        # store at once (both rewrite pg_proc/pg_trigger rows); one schema lock per database serialises it.
        curs.execute(SQL("SELECT pg_advisory_xact_lock(hashtext('lwapi:eventstore-schema'))"), prepare=False)
        super()._create_table(curs)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """As eventsourcing's, but without psycopg's pipeline mode: with a large event (a batch of a few
        thousand usage entries, some hundreds of kB) the pipeline's sync deadlocks, the server waiting in
        ClientRead for bytes the client never flushes (psycopg/psycopg#685), until the lock timeout. The
        few extra round trips cost microseconds on a batch of entries."""
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._insert_events(curs, stored_events, **kwargs)
            if not stored_events:
                return None
            self._insert_stored_events(curs, stored_events, **kwargs)
            return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)

    def _insert_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        request_ids: Sequence[str] = kwargs.get(CLAIMS_KWARG) or ()
        if request_ids:
            curs.execute(self._insert_claims, (list(request_ids),), prepare=True)

    def claimed_request_ids(self, request_ids: Sequence[str]) -> set[str]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_claims, (list(request_ids),))
            return {row["request_id"] for row in curs.fetchall()}


class ClaimingPostgresFactory(PostgresFactory):
    application_recorder_class = ClaimingPostgresApplicationRecorder


Factory = ClaimingPostgresFactory
