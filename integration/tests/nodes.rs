//! Node identity at the queen: a node may only replace its own registration.

use skep_integration::{Cluster, PoolOpts, audit_text, wait_until};

#[test]
fn a_node_cannot_take_over_another_nodes_pool_url() {
    let mut cluster = Cluster::start(PoolOpts::default());
    cluster.wait_for_nodes(1);
    let first = std::fs::read_to_string(cluster.pools[0].dir.join("listen.addr")).unwrap();
    let url = format!("http://{}", first.trim());
    // A second enrolled pool that advertises the first one's URL.
    let impostor = cluster.add_pool(PoolOpts {
        extra_args: vec!["--advertise".into(), url.clone()],
        ..PoolOpts::default()
    });
    // Refused, and told why (it keeps retrying: it gets in only if the holder stops).
    let log = || std::fs::read_to_string(cluster.dir.join(format!("pool{impostor}.log"))).unwrap();
    wait_until("the impostor to be refused", || {
        log().contains("registered by another node")
    });
    // Audited at the queen.
    let audit_dir = cluster.dir.join("queen").join("audit");
    wait_until("node.url_conflict in the queen's audit log", || {
        audit_text(&audit_dir).contains("node.url_conflict")
    });
    // The first node keeps its registration and serves, with no eviction in between.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(cluster.healthy_nodes(), Ok(1));
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 3, "still mine"));
    let queen_log = std::fs::read_to_string(cluster.dir.join("queen.log")).unwrap();
    assert!(
        !queen_log.contains("pool session lost"),
        "the first pool's session must not have been cut: {queen_log}"
    );
}
