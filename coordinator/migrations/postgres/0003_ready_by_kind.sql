-- Claims look up ready tasks kind by kind, oldest first: without this index a
-- claim sorted every ready task of the migrations it looked at, on each pass.
CREATE INDEX tasks_ready_kind ON tasks (kind, ready_at, id) WHERE state = 'ready';
