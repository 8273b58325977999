-- A worker's live leases, newest first and at most `most` of them: the count
-- every dispatch pass takes of each worker's free slots (I12). Written as a
-- subquery per element of an array of workers, the count was planned afresh
-- on every call (~0.1 ms, more than running it): the planner cannot see the
-- array's length, so a generic plan never looked cheaper. PL/pgSQL keeps the
-- plan of the query inside for the session. STABLE: it reads with the
-- snapshot of the statement that calls it, as the subquery did.
CREATE FUNCTION stagecoach_live_leases(_worker TEXT, _most BIGINT) RETURNS BIGINT
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- A plain backward index scan of tasks_lease, which stops at `_most`
    -- and marks the entries of ended leases dead as it passes them.
    RETURN (SELECT count(*) FROM (
                SELECT 1 FROM tasks t
                WHERE t.state = 'leased' AND t.lease_worker = _worker
                ORDER BY t.lease_expires_at DESC LIMIT _most) AS live);
END
$$;
