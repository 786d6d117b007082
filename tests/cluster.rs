//! The harness's Redis Cluster (for the cluster-mode work of issue 13): six nodes, three primaries
//! with a replica each, every slot served; a killed primary is replaced by its replica.

use std::process::Command;
use std::time::Duration;

use cacheward::dev::cluster::RedisCluster;

/// `redis-cli -c -p PORT args…` (follows MOVED redirections): its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_harness_makes_a_six_node_cluster_that_fails_over() {
    let mut cluster = RedisCluster::start().expect("start the cluster");
    let ports = cluster.ports().to_vec();
    assert!(cli(ports[0], &["CLUSTER", "INFO"]).contains("cluster_slots_assigned:16384"));
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    // Keys of every slot range, written through one node and read through another.
    for i in 0..30 {
        let key = format!("user:k{i}");
        assert_eq!(cli(ports[0], &["SET", &key, "v"]), "OK");
        assert_eq!(cli(ports[5], &["GET", &key]), "v");
    }
    // Replication is asynchronous: give it a moment (localhost: well under a millisecond).
    std::thread::sleep(Duration::from_millis(500));
    // A primary dies: its replica is promoted within a few node timeouts.
    let victim = ports.iter().position(|p| *p == primaries[0]).unwrap();
    cluster.kill(victim);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while cluster.primaries().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no replica took over:\n{}",
            cli(ports[(victim + 1) % ports.len()], &["CLUSTER", "NODES"]),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
        .await_state_ok(Duration::from_secs(15))
        .expect("the cluster recovers");
    for i in 0..30 {
        let key = format!("user:k{i}");
        let survivor = ports[(victim + 1) % ports.len()];
        assert_eq!(
            cli(survivor, &["GET", &key]),
            "v",
            "{key} after the failover"
        );
    }
}
