//! `migrate`: the keyspace (vnodes, never tablets), the schema file's statements, and the
//! one-off data steps of [`super::upgrade`]. What the schema may contain and why is written
//! at the top of `deploy/scylla/schema.cql`.

use scylla::client::session::Session;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};

use super::config::ScyllaConfig;
use super::rows::exec_err;
use crate::store::StoreError;

/// The schema file, embedded so the binary can migrate with nothing else on disk.
pub const SCHEMA: &str = include_str!("../../../../deploy/scylla/schema.cql");
/// Default replication for `migrate`: one replica in every datacenter (a development node).
pub const DEFAULT_REPLICATION: &str =
    "{'class': 'NetworkTopologyStrategy', 'replication_factor': 1}";

/// One statement of the schema file after `USE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaStatement {
    /// `CREATE ... IF NOT EXISTS ...`: applying it again changes nothing.
    Create(String),
    /// `ALTER TABLE <table> ADD <column> <type>`: applied only when the column is missing.
    AddColumn {
        table: String,
        column: String,
        cql: String,
    },
}

/// The statements of a schema file after `CREATE KEYSPACE` and `USE`, comments stripped;
/// an error names the first statement that is neither kind of [`SchemaStatement`].
pub fn parse_schema(text: &str) -> Result<Vec<SchemaStatement>, String> {
    let text: String = text
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for statement in text.split(';') {
        let cql = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        let upper = cql.to_ascii_uppercase();
        if cql.is_empty() || upper.starts_with("CREATE KEYSPACE ") || upper.starts_with("USE ") {
            continue;
        }
        let words: Vec<&str> = cql.split(' ').collect();
        let word = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase());
        if upper.starts_with("CREATE ") && word(2).as_deref() == Some("IF") {
            if word(3).as_deref() == Some("NOT") && word(4).as_deref() == Some("EXISTS") {
                out.push(SchemaStatement::Create(cql));
                continue;
            }
        } else if word(0).as_deref() == Some("ALTER")
            && word(1).as_deref() == Some("TABLE")
            && word(3).as_deref() == Some("ADD")
            && words.len() >= 6
            && !words[4].starts_with('(')
            && !matches!(word(4).as_deref(), Some("IF"))
        {
            out.push(SchemaStatement::AddColumn {
                table: words[2].to_ascii_lowercase(),
                column: words[4].to_ascii_lowercase(),
                cql,
            });
            continue;
        }
        return Err(format!(
            "schema statement is neither CREATE ... IF NOT EXISTS nor \
             ALTER TABLE <table> ADD <column> <type>: {cql}"
        ));
    }
    Ok(out)
}

/// The statements of [`SCHEMA`].
pub fn schema_statements() -> Result<Vec<SchemaStatement>, StoreError> {
    parse_schema(SCHEMA).map_err(StoreError::Internal)
}

/// A replication map for `CREATE KEYSPACE`: `{...}` of quoted names, numbers, `:` and `,`.
fn valid_replication(r: &str) -> bool {
    let r = r.trim();
    r.starts_with('{')
        && r.ends_with('}')
        && r[1..r.len() - 1]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " '_:,.-".contains(c))
}

/// `CREATE KEYSPACE IF NOT EXISTS`, opting out of tablets unless `with_tablets_option` is
/// false (only for servers that do not know the option).
pub fn create_keyspace_cql(ks: &str, replication: &str, with_tablets_option: bool) -> String {
    let create = format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}");
    if with_tablets_option {
        format!("{create} AND tablets = {{'enabled': false}}")
    } else {
        create
    }
}

/// Whether a `CREATE KEYSPACE` failed because the server does not know the `tablets` option
/// (ScyllaDB < 6 and Cassandra answer a syntax error "Unknown property 'tablets'"). Anything
/// else (a timeout while a node bootstraps, tablets enforced by the cluster's configuration)
/// is a real failure: falling back would create a keyspace with tablets.
pub fn tablets_option_unknown(e: &ExecutionError) -> bool {
    matches!(
        e,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::SyntaxError, msg))
            if msg.contains("tablets")
    )
}

/// Creates the keyspace (with `replication`, a CQL map) and every table, idempotently, then
/// runs the one-off data steps not yet done.
pub async fn migrate(config: &ScyllaConfig, replication: &str) -> Result<(), StoreError> {
    if !valid_replication(replication) {
        return Err(StoreError::Internal(format!(
            "bad replication {replication:?}: expected a CQL map like {DEFAULT_REPLICATION}"
        )));
    }
    let statements = schema_statements()?;
    let session = config.session(&config.driver.profiles()).await?;
    let ks = &config.keyspace;
    create_keyspace(&session, ks, replication).await?;
    session
        .use_keyspace(ks.as_str(), false)
        .await
        .map_err(|e| StoreError::Unavailable(format!("USE {ks}: {e}")))?;
    // Schema changes: the driver waits for schema agreement after each one by itself.
    for statement in statements {
        match statement {
            SchemaStatement::Create(cql) => {
                session.query_unpaged(cql, &[]).await.map_err(exec_err)?;
            }
            SchemaStatement::AddColumn { table, column, cql } => {
                add_column(&session, ks, &table, &column, cql).await?;
            }
        }
    }
    super::upgrade::run(&session, ks).await?;
    tracing::info!(keyspace = %ks, "scylla schema applied");
    Ok(())
}

async fn create_keyspace(session: &Session, ks: &str, replication: &str) -> Result<(), StoreError> {
    match session
        .query_unpaged(create_keyspace_cql(ks, replication, true), &[])
        .await
    {
        Ok(_) => {}
        Err(e) if tablets_option_unknown(&e) => {
            tracing::info!(error = %e, "the server has no tablets: keyspace without the option");
            session
                .query_unpaged(create_keyspace_cql(ks, replication, false), &[])
                .await
                .map_err(exec_err)?;
        }
        Err(e) => return Err(exec_err(e)),
    }
    // IF NOT EXISTS keeps a keyspace that was there before, with whatever it was made with.
    session
        .refresh_metadata()
        .await
        .map_err(|e| StoreError::Unavailable(format!("scylla metadata: {e}")))?;
    let state = session.get_cluster_state();
    let keyspace = state
        .get_keyspace(ks)
        .ok_or_else(|| StoreError::Internal(format!("keyspace {ks} missing after CREATE")))?;
    if keyspace.tablet_based {
        return Err(StoreError::Internal(format!(
            "keyspace {ks} uses tablets; this store needs vnodes (lightweight transactions, \
             counters): recreate it WITH tablets = {{'enabled': false}}"
        )));
    }
    tracing::info!(
        keyspace = %ks,
        replication = ?keyspace.strategy,
        "keyspace ready (replication settings only apply when it is created)"
    );
    Ok(())
}

/// `ALTER TABLE .. ADD` when the column is missing. A concurrent `migrate` may add it between
/// the look and the ALTER: a failed ALTER whose column exists afterwards is success.
async fn add_column(
    session: &Session,
    ks: &str,
    table: &str,
    column: &str,
    cql: String,
) -> Result<(), StoreError> {
    let has_column = || {
        session
            .get_cluster_state()
            .get_keyspace(ks)
            .and_then(|k| k.tables.get(table))
            .is_some_and(|t| t.columns.contains_key(column))
    };
    let refresh = || async {
        session
            .refresh_metadata()
            .await
            .map_err(|e| StoreError::Unavailable(format!("scylla metadata: {e}")))
    };
    refresh().await?;
    if has_column() {
        return Ok(());
    }
    if let Err(e) = session.query_unpaged(cql, &[]).await {
        refresh().await?;
        if !has_column() {
            return Err(exec_err(e));
        }
    }
    tracing::info!(%table, %column, "column added");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_replication_strategy_opts_out_of_tablets() {
        for replication in [
            DEFAULT_REPLICATION,
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3}",
        ] {
            assert!(valid_replication(replication), "{replication}");
            assert_eq!(
                create_keyspace_cql("chat", replication, true),
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = {replication} \
                     AND tablets = {{'enabled': false}}"
                )
            );
            let plain = create_keyspace_cql("chat", replication, false);
            assert!(!plain.contains("tablets"), "{plain}");
        }
        assert!(!valid_replication("{'class': 'X'}; DROP KEYSPACE chat"));
    }

    fn db_error(db: DbError, msg: &str) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, msg.into()))
    }

    #[test]
    fn only_an_unknown_tablets_option_falls_back() {
        assert!(tablets_option_unknown(&db_error(
            DbError::SyntaxError,
            "Unknown property 'tablets'"
        )));
        // A node still bootstrapping, a cluster that enforces tablets, or any other failure
        // must not lead to a keyspace created without the opt-out.
        for e in [
            ExecutionError::RequestTimeout(std::time::Duration::from_secs(12)),
            db_error(
                DbError::Unavailable {
                    consistency: scylla::statement::Consistency::All,
                    required: 3,
                    alive: 1,
                },
                "Cannot achieve consistency level",
            ),
            db_error(
                DbError::ConfigError,
                "Tablets are enforced: cannot disable tablets for keyspace chat",
            ),
            db_error(DbError::SyntaxError, "Unknown property 'durable'"),
            db_error(DbError::ServerError, "tablets"),
        ] {
            assert!(!tablets_option_unknown(&e), "{e}");
        }
    }

    #[test]
    fn the_schema_file_is_creates_only_and_parses() {
        let statements = schema_statements().unwrap();
        assert!(statements.len() >= 10, "{statements:?}");
        for s in &statements {
            match s {
                SchemaStatement::Create(cql) => {
                    assert!(cql.starts_with("CREATE TABLE IF NOT EXISTS "), "{cql}");
                    assert!(!cql.contains("--"), "comments stripped: {cql}");
                }
                SchemaStatement::AddColumn { cql, .. } => {
                    assert!(cql.starts_with("ALTER TABLE "), "{cql}")
                }
            }
        }
        // The file itself opts out of tablets for cqlsh users too.
        assert!(SCHEMA.contains("AND tablets = {'enabled': false};"));
    }

    #[test]
    fn alter_table_add_is_a_statement_of_its_own() {
        let text = "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = {'class': 'X'};
            USE chat;
            -- a comment; with a semicolon
            CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY);
            ALTER TABLE t ADD note text; -- added later
            alter table T add Other   frozen<list<int>>;";
        assert_eq!(
            parse_schema(text).unwrap(),
            vec![
                SchemaStatement::Create("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)".into()),
                SchemaStatement::AddColumn {
                    table: "t".into(),
                    column: "note".into(),
                    cql: "ALTER TABLE t ADD note text".into(),
                },
                SchemaStatement::AddColumn {
                    table: "t".into(),
                    column: "other".into(),
                    cql: "alter table T add Other frozen<list<int>>".into(),
                },
            ]
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "CREATE TABLE t (a int PRIMARY KEY)",
            "ALTER TABLE t DROP note",
            "ALTER TABLE t RENAME a TO b",
            "ALTER TABLE t ADD note",
            "ALTER TABLE t ADD (a int, b int)",
            "ALTER TABLE t WITH compaction = {'class': 'LeveledCompactionStrategy'}",
            "DROP TABLE t",
            "TRUNCATE t",
            "INSERT INTO t (a) VALUES (1)",
        ] {
            let e = parse_schema(&format!("{bad};")).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
