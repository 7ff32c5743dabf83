//! Redis losing data under steady traffic, with writers on both gateways (the chaos clients of
//! `super::chaos`, through nginx): a Redis restarted without persistence, and a Redis Cluster
//! primary failing over to a replica that missed the last writes; and the ordinary cluster
//! faults: a primary killed with `kill -9`, a slot migrated to another primary. Afterwards
//! every acknowledged message is counted against the history API (`chaos::check`): in history
//! once, with the seq of its ack, in order; every client saw every one exactly once (live,
//! replayed, or filled from history after a rejoin from an older epoch); and no stored message
//! was overwritten (`chat_store_seq_conflicts_total` stays 0).

use std::time::Duration;

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
    let mut redis = Redis::start_volatile().await;
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
