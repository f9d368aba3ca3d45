//! The throwaway PostgreSQL cluster: start, databases, restart with data kept, cleanup.

use shardpress_testkit::PgCluster;

#[test]
fn cluster_serves_keeps_data_across_restart_and_cleans_up() {
    let mut pg = PgCluster::start();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    assert!(pg.url().ends_with("/postgres"));
    assert_eq!(pg.psql("postgres", "SELECT 1 + 1").trim(), "2");
    assert_eq!(pg.psql("postgres", "SHOW fsync").trim(), "off");
    assert_eq!(
        pg.psql("postgres", "SHOW listen_addresses").trim(),
        "127.0.0.1"
    );

    let url = pg.create_database("jobs_test");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/jobs_test", pg.port())
    );
    pg.psql(
        "jobs_test",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (42)",
    );

    let port = pg.port();
    pg.stop();
    assert!(!pg.is_running());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("jobs_test", "SELECT v FROM t").trim(), "42");
    pg.restart();
    assert_eq!(pg.psql("jobs_test", "SELECT count(*) FROM t").trim(), "1");

    let data = pg.data_dir();
    assert!(data.join("PG_VERSION").is_file());
    drop(pg);
    assert!(!data.exists(), "data directory left behind");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn clusters_run_side_by_side() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    assert_ne!(a.port(), b.port());
    a.create_database("only_in_a");
    let list = |pg: &PgCluster| pg.psql("postgres", "SELECT datname FROM pg_database");
    assert!(list(&a).contains("only_in_a"));
    assert!(!list(&b).contains("only_in_a"));
}
