-- The worker whose lease of the task last expired (NULL: none ever did). A
-- dispatch pass deals such a task to another worker when one has a free
-- slot, so a frozen worker does not get back the task it just lost. Kept
-- in the database, not only in the coordinator's cache of workers: any
-- coordinator's sweeper may expire a lease and any coordinator may claim
-- the task again. Written only by the sweeper; read with the candidates a
-- pass reads anyway.
ALTER TABLE tasks ADD COLUMN expired_worker TEXT;
