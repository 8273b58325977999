-- A migration's running stage (at most one, I1), found by migration without
-- walking all of its stages: every dispatch pass reads the running stages of
-- the migrations it leases from, and every stage transition looks its
-- migration's up. By primary key alone each lookup read every stage row of
-- the migration and filtered them — 0.12 ms a pass for a migration of 1,000
-- stages, growing with the plan. A stage's state changes twice in its life;
-- the counter updates in between leave this index alone.
CREATE INDEX stages_running ON stages (migration_id) WHERE state = 'running';
