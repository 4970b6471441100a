-- Read models: derived from es.events, rebuildable, never the record.
CREATE SCHEMA IF NOT EXISTS read;

-- One row per (projector, partition): the commit token of the last event applied. Updated in the
-- same transaction as the rows it covers.
CREATE TABLE read.checkpoints (
    projector       text NOT NULL,
    partition       integer NOT NULL,
    transaction_id  bigint NOT NULL DEFAULT 0,
    global_position bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, partition)
);

CREATE TABLE read.conversations (
    conversation_id uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    stream_id       text NOT NULL,
    title           text NOT NULL,
    status          text NOT NULL CHECK (status IN ('active', 'archived')),
    message_count   bigint NOT NULL DEFAULT 0,
    last_message_at timestamptz,
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    archived_at     timestamptz,
    version         bigint NOT NULL
);
CREATE INDEX conversations_tenant_page ON read.conversations (tenant_id, conversation_id DESC);
CREATE INDEX conversations_tenant_status_page ON read.conversations (tenant_id, status, conversation_id DESC);

CREATE TABLE read.messages (
    message_id      uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    tenant_id       text NOT NULL,
    author          text NOT NULL,
    text            text NOT NULL,
    posted_at       timestamptz NOT NULL,
    stream_version  bigint NOT NULL,
    UNIQUE (conversation_id, stream_version)
);

-- Poison events: recorded after bounded attempts, visible and retryable, never silently skipped.
-- A stream with an open dead letter is parked: its later events queue here too, in order.
CREATE TABLE read.dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projector       text NOT NULL,
    event_id        uuid NOT NULL,
    stream_id       text NOT NULL,
    tenant_id       text,
    partition       integer NOT NULL,
    transaction_id  bigint NOT NULL,
    global_position bigint NOT NULL,
    event_type      text NOT NULL,
    error           text NOT NULL,
    attempts        integer NOT NULL,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    UNIQUE (projector, event_id)
);
CREATE INDEX dead_letters_open_stream ON read.dead_letters (projector, stream_id, transaction_id, global_position) WHERE status = 'open';
