-- Every write, in revision order: what a watch replays and what History reads.
-- `value` is NULL for a delete. A transaction that writes several documents gives
-- them one revision, as etcd does.
CREATE TABLE changes (
    revision        INTEGER NOT NULL,
    key             TEXT    NOT NULL,
    value           BLOB,
    create_revision INTEGER NOT NULL,
    PRIMARY KEY (revision, key)
);

CREATE INDEX changes_by_key ON changes (key, revision);

-- Documents written before this table existed count as changes at their revision.
INSERT INTO changes (revision, key, value, create_revision)
    SELECT mod_revision, key, value, create_revision FROM kv;

-- Changes after `revision` are all in `changes`; a watch from an earlier revision
-- has to take a snapshot instead.
CREATE TABLE change_log_start (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);

INSERT INTO change_log_start (id, revision) SELECT 1, revision FROM revision;
