-- API keys as a read model (projector `api_keys`). Only the sha256 of a key's secret is stored.
-- last_used_at is operational metadata written by the gateway on authentication (throttled to
-- once a minute per key); it is not an event and is lost on a rebuild of this table.
CREATE TABLE read.api_keys (
    key_id       uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    name         text NOT NULL,
    roles        text[] NOT NULL,
    secret_hash  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_by    text NOT NULL,
    issued_at    timestamptz NOT NULL,
    revoked_by   text,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    version      bigint NOT NULL
);
CREATE INDEX api_keys_tenant_page ON read.api_keys (tenant_id, key_id DESC);
