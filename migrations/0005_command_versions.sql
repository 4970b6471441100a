-- Idempotency records name the versions their command wrote instead of carrying a copy of the
-- result: the first result (versions, commit token, event ids) is read back from es.events, which
-- already holds it. A record is then a fixed-size row written without building any jsonb, in the
-- same statement as the events. Records written before this migration keep their `result`, and
-- readers use it when these columns are null.
ALTER TABLE es.commands
    ADD COLUMN first_version bigint,
    ADD COLUMN last_version bigint;
