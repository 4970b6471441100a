-- The event store: the log of record. Never edit once applied; add a new migration instead.
CREATE SCHEMA IF NOT EXISTS es;

-- Fixed settings of this store. `partitions` decides which partition a stream's events land in;
-- changing it after events exist would reorder streams across partitions, so it lives here,
-- beside the data, and not in per-process configuration.
CREATE TABLE es.settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024)
);
INSERT INTO es.settings (partitions) VALUES (8);

CREATE TABLE es.events (
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction: readers order by (transaction_id, global_position) and stop at the
    -- oldest open transaction, so a late commit with a lower position is never skipped.
    transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid NOT NULL,
    stream_id       text NOT NULL,
    stream_version  bigint NOT NULL CHECK (stream_version > 0),
    partition       integer NOT NULL,
    event_type      text NOT NULL,
    schema_version  integer NOT NULL DEFAULT 1,
    payload         jsonb NOT NULL,
    metadata        jsonb NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);
CREATE INDEX events_commit_order ON es.events (transaction_id, global_position);
CREATE INDEX events_partition_order ON es.events (partition, transaction_id, global_position);

-- Idempotency: one row per command id, holding a hash of the request and the first result.
CREATE TABLE es.commands (
    command_id   text PRIMARY KEY,
    request_hash bytea NOT NULL,
    stream_id    text NOT NULL,
    result       jsonb,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- Cursors of log readers (the relay): always the (transaction_id, global_position) pair.
CREATE TABLE es.cursors (
    name            text PRIMARY KEY,
    transaction_id  bigint NOT NULL DEFAULT 0,
    global_position bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
