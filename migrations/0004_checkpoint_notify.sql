-- Read-your-writes waiters (the query API) learn that a projector's checkpoint moved from a
-- notification instead of polling `read.checkpoints`. The payload is
-- `<projector> <partition> <transaction_id> <global_position>`; notifications are delivered in
-- commit order, so the last one seen for a (projector, partition) is its checkpoint. A listener
-- that lost its connection reloads the table, since notifications sent meanwhile are lost.
CREATE FUNCTION read.notify_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'nura_checkpoints',
        NEW.projector || ' ' || NEW.partition || ' ' || NEW.transaction_id || ' '
            || NEW.global_position
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER checkpoint_moved
    AFTER INSERT OR UPDATE OF transaction_id, global_position ON read.checkpoints
    FOR EACH ROW EXECUTE FUNCTION read.notify_checkpoint();
