//! Redis losing data under steady traffic, with writers on both gateways (the chaos clients of
//! `super::chaos`, through nginx): a Redis restarted without persistence, and a Redis Cluster
//! primary failing over to a replica that missed the last writes; and the ordinary cluster
//! faults: a primary killed with `kill -9`, a slot migrated to another primary. Afterwards
//! every acknowledged message is counted against the history API (`chaos::check`): in history
//! once, with the seq of its ack, in order; every client saw every one exactly once (live,
//! replayed, or filled from history after a rejoin from an older epoch); and no stored message
//! was overwritten (`chat_store_seq_conflicts_total` stays 0).

use history_service::{partitions, redis_conn::slot_of};

use super::chaos::{chaos_client, check, progress, Shared, ROOM};
use super::procs::*;
use super::redis_cluster::TEST_PARTITIONS;
use crate::support::*;

const CLIENTS: usize = 4;
const ENV: [(&str, &str); 2] = [("CHAT_MESSAGES_PER_S", "100"), ("CHAT_BURST", "100")];

/// The chaos clients, through `lb`.
fn clients(
    lb: std::net::SocketAddr,
    shared: &std::sync::Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<super::chaos::Tally>> {
    (0..CLIENTS)
        .map(|i| tokio::spawn(chaos_client(lb, format!("c{i}"), shared.clone())))
        .collect()
}

/// Stops the traffic and collects what every client saw.
async fn finish(
    shared: &Shared,
    clients: Vec<tokio::task::JoinHandle<super::chaos::Tally>>,
) -> Vec<super::chaos::Tally> {
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut tallies = vec![];
    for c in clients {
        tallies.push(c.await.unwrap());
    }
    tallies
}

/// The sum of a metric over processes.
async fn total(addrs: &[std::net::SocketAddr], name: &str) -> f64 {
    let mut sum = 0.0;
    for a in addrs {
        sum += metric(*a, name).await;
    }
    sum
}

#[tokio::test]
async fn a_redis_restarted_without_its_data_loses_no_acknowledged_message() {
    let started = std::time::Instant::now();
    let redis = Redis::start_volatile().await;
    let history = History::start(redis.env(), "history-1").await;
    let mut backend = Backend { redis, history };
    let g1 = Gateway::start(&backend, "g1", &ENV).await;
    let g2 = Gateway::start(&backend, "g2", &ENV).await;
    let lb = Nginx::start(&[g1.addr, g2.addr], backend.history.addr).await;
    let mut owner = Client::connect_addr(lb.addr, "owner", "/ws").await;
    owner.join(ROOM).await;
    drop(owner);

    let shared = Shared::new(CLIENTS);
    let running = clients(lb.addr, &shared);
    progress(&shared, 40, "steady traffic").await;
    backend.redis.restart().await; // kill -9, and back empty
    progress(&shared, 60, "redis back without its data").await;
    let tallies = finish(&shared, running).await;

    let checked = check(&tallies, backend.history.addr, false).await;
    let gateways = [g1.addr, g2.addr];
    let resets = total(&gateways, "chat_broker_resets_total").await;
    let reappended = total(&gateways, "chat_broker_reappended_total").await;
    let republished = total(&gateways, "chat_broker_republished_total").await;
    let conflicts = metric(backend.history.addr, "chat_store_seq_conflicts_total").await;
    eprintln!(
        "redis restarted empty: {checked:?}; {resets} partition resets noticed, {reappended} \
         events appended again, {republished} published again, {conflicts} seq conflicts, {:?}",
        started.elapsed()
    );
    assert!(resets >= 1.0, "the gateways noticed the loss");
    assert_eq!(conflicts, 0.0, "no stored message was offered a taken seq");
    assert!(
        checked.unrecovered >= 1,
        "clients of the old epoch filled from history"
    );
}

/// The slot of the test room's partition (where its keys and persistence stream live).
fn room_slot() -> u16 {
    slot_of(&partitions::stream(partitions::of(ROOM, TEST_PARTITIONS)))
}

/// Two gateways on a Redis Cluster (every process with the Redis `settings`), behind nginx;
/// the room exists.
async fn cluster_shape(settings: &[(&'static str, &str)]) -> (ClusterBackend, Vec<Gateway>, Nginx) {
    let backend = ClusterBackend::start_with(settings).await;
    let gateways = vec![
        Gateway::start(&backend, "g1", &ENV).await,
        Gateway::start(&backend, "g2", &ENV).await,
    ];
    let addrs: Vec<_> = gateways.iter().map(|g| g.addr).collect();
    let lb = Nginx::start(&addrs, backend.histories[0].addr).await;
    let mut owner = Client::connect_addr(lb.addr, "owner", "/ws").await;
    owner.join(ROOM).await;
    (backend, gateways, lb)
}

/// What the gateways and history services counted.
#[derive(Debug)]
struct Counted {
    /// Partition epochs replaced (each gateway counts what it noticed).
    resets: f64,
    /// Acknowledged events published again under a new seq.
    republished: f64,
    /// Messages the store kept out because another held their seq.
    conflicts: f64,
}

async fn counted(backend: &ClusterBackend, gateways: &[Gateway]) -> Counted {
    let addrs: Vec<_> = gateways.iter().map(|g| g.addr).collect();
    let histories: Vec<_> = backend.histories.iter().map(|h| h.addr).collect();
    Counted {
        resets: total(&addrs, "chat_broker_resets_total").await,
        republished: total(&addrs, "chat_broker_republished_total").await,
        conflicts: total(&histories, "chat_store_seq_conflicts_total").await,
    }
}

/// The room's primary fails over to a replica that missed its last writes: the replica is
/// stopped and loses its link (it cannot reconnect), the primary takes more writes, dies,
/// and the replica takes over without them. With `wait` (`CHAT_REDIS_WAIT_REPLICAS=1`) the
/// writes the replica misses are never acknowledged.
async fn failover_losing_writes(wait: bool) -> (super::chaos::Checked, Counted) {
    let env: &[(&'static str, &str)] = if wait {
        &[("CHAT_REDIS_WAIT_REPLICAS", "1")]
    } else {
        &[]
    };
    let (mut backend, gateways, lb) = cluster_shape(env).await;
    let shared = Shared::new(CLIENTS);
    let running = clients(lb.addr, &shared);
    progress(&shared, 30, "steady traffic").await;

    let cluster = &mut backend.cluster;
    let primary = cluster.primary_of(room_slot()).await;
    let replica = cluster.replica_of(primary).await;
    cluster.signal(replica, "STOP");
    cluster.cut_replicas(primary).await;
    if wait {
        // Writes go on, and none is acknowledged: no replica has them.
        let addrs: Vec<_> = gateways.iter().map(|g| g.addr).collect();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while total(&addrs, "chat_broker_wait_short_total").await < 4.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no write waited for the replica"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    } else {
        progress(&shared, 20, "writes the replica does not get").await;
    }
    cluster.kill(primary).await;
    cluster.signal(replica, "CONT");
    let now = cluster.wait_failover(room_slot(), primary).await;
    assert_eq!(now, replica, "the replica took over");
    if wait {
        // Acknowledgements need a replica of the new primary: the old node, back empty as a
        // new replica (restarted on its old cluster config it would serve its old slots for a
        // moment, and take writes no replica ever gets).
        cluster.rejoin_as_replica(primary, now).await;
    }
    progress(&shared, 60, "failover to the replica that missed writes").await;
    if !wait {
        cluster.restart(primary).await;
    }
    progress(&shared, 20, "old primary back as a replica").await;
    let tallies = finish(&shared, running).await;

    let checked = check(&tallies, backend.histories[0].addr, false).await;
    let counted = counted(&backend, &gateways).await;
    eprintln!("failover that lost writes (WAIT: {wait}): {checked:?}; {counted:?}");
    assert!(
        counted.resets >= 1.0,
        "the gateways noticed the lost writes"
    );
    assert!(checked.acked > 0 && checked.stored >= checked.acked);
    (checked, counted)
}

#[tokio::test]
async fn a_failover_to_a_replica_that_missed_writes_loses_no_acknowledged_message() {
    let (checked, counted) = failover_losing_writes(false).await;
    // A history service read some of the lost writes from the old primary before it died and
    // stored them; the replica gave their seqs to other acknowledged messages, which the
    // store kept out — and their gateways published them again under new seqs.
    assert!(
        counted.conflicts <= counted.republished,
        "every message kept out of the store was published again: {counted:?}"
    );
    assert_eq!(checked.moved as f64, counted.republished);
}

#[tokio::test]
async fn with_wait_a_failover_to_a_replica_that_missed_writes_keeps_every_ack_in_place() {
    let (checked, counted) = failover_losing_writes(true).await;
    assert_eq!(counted.conflicts, 0.0, "no unreplicated write was stored");
    assert_eq!(
        checked.moved, 0,
        "every message stored with the seq of its ack"
    );
    assert_eq!(
        checked.out_of_order, 0,
        "every client's messages in the order sent"
    );
}

#[tokio::test]
async fn with_wait_a_primary_killed_under_traffic_loses_nothing_and_keeps_the_order() {
    let (mut backend, gateways, lb) = cluster_shape(&[("CHAT_REDIS_WAIT_REPLICAS", "1")]).await;
    let shared = Shared::new(CLIENTS);
    let running = clients(lb.addr, &shared);
    progress(&shared, 30, "steady traffic").await;

    let cluster = &mut backend.cluster;
    let primary = cluster.primary_of(room_slot()).await;
    cluster.kill(primary).await;
    cluster.wait_failover(room_slot(), primary).await;
    // Acknowledgements need a replica of the new primary: the old one, back.
    cluster.restart(primary).await;
    progress(&shared, 40, "kill -9 of the room's primary").await;
    cluster.wait_healthy().await;
    progress(&shared, 20, "old primary back as a replica").await;
    let tallies = finish(&shared, running).await;

    let checked = check(&tallies, backend.histories[0].addr, false).await;
    let counted = counted(&backend, &gateways).await;
    eprintln!("kill -9 of a primary (WAIT 1): {checked:?}; {counted:?}");
    assert_eq!(counted.conflicts, 0.0);
    assert_eq!(
        checked.moved, 0,
        "every message stored with the seq of its ack"
    );
    assert_eq!(
        checked.out_of_order, 0,
        "every client's messages in the order sent"
    );
}

#[tokio::test]
async fn a_slot_migrated_under_traffic_loses_nothing_and_keeps_every_seq() {
    let (backend, gateways, lb) = cluster_shape(&[]).await;
    let shared = Shared::new(CLIENTS);
    let running = clients(lb.addr, &shared);
    progress(&shared, 30, "steady traffic").await;

    // The room's partition moves to another primary, key by key, while the clients write:
    // its scripts meet ASK and TRYAGAIN, its channel is unsubscribed at the old primary.
    let cluster = &backend.cluster;
    let from = cluster.primary_of(room_slot()).await;
    let to = cluster.primary_other_than(from).await;
    cluster.migrate_slot(room_slot(), to).await;
    progress(&shared, 40, "slot migrated to another primary").await;
    let tallies = finish(&shared, running).await;

    // Nothing was lost: no reset, every message with the seq of its ack, live or replayed.
    let checked = check(&tallies, backend.histories[0].addr, true).await;
    let counted = counted(&backend, &gateways).await;
    eprintln!("slot migration: {checked:?}; {counted:?}");
    assert_eq!(counted.resets, 0.0, "a migration is not a data loss");
    assert_eq!(counted.conflicts, 0.0);
    assert_eq!(checked.moved, 0);
    assert_eq!(checked.out_of_order, 0);
}
