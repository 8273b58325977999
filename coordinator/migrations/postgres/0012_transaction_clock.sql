-- One instant per transaction: the clock is the transaction's start, not the
-- moment each statement reads it. Every check a transition makes against
-- time (a deadline, a lease's expiry, a retry's backoff) and every time it
-- writes (its events, a lease's start) are then the same instant, so a
-- deadline check and the events it lets through agree exactly (I10), as on
-- SQLite, where the store reads its clock once per transaction.
CREATE OR REPLACE FUNCTION stagecoach_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE
    AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::bigint $$;
