-- The arrays of a batch row (a few kilobytes for a few hundred events) are
-- compressed on insert; with the default pglz that took ~0.2 ms a row — a
-- microsecond per task on each of a claim's and a completion's statements —
-- and lz4 takes a quarter of it for about the same size. A server built
-- without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE event_batches
        ALTER COLUMN ids SET COMPRESSION lz4,
        ALTER COLUMN task_ids SET COMPRESSION lz4,
        ALTER COLUMN attempts SET COMPRESSION lz4,
        ALTER COLUMN worker_ids SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available in this server: event batches stay pglz-compressed';
END
$$;
