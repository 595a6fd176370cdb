-- Documents with etcd semantics: every write increments the single global revision,
-- which becomes the written key's mod_revision.
CREATE TABLE kv (
    key             TEXT    NOT NULL PRIMARY KEY,
    value           BLOB    NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL
);

CREATE TABLE revision (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);

-- Like etcd, an empty store is at revision 1 and the first write makes revision 2.
INSERT INTO revision (id, revision) VALUES (1, 1);
