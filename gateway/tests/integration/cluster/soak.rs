//! A bounded soak: steady traffic for `CHAT_SOAK_SECONDS` (default 0: skipped, with a printed
//! SKIPPED line; `scripts/test.sh` runs it for 60 s, longer runs are on demand) against a real
//! gateway process on Redis and the history service. Samples the gateway's RSS
//! (`/proc/<pid>/status`) and its deepest outbound queue (`/metrics`) every second, then
//! asserts no growth trend and no errors: every message acked, every member got every message.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use super::procs::*;
use crate::support::*;

const ROOMS: usize = 4;
const PER_ROOM: usize = 5;
/// Messages per second per client: 20 clients × 4/s = 80 messages/s, 400 deliveries/s.
const PER_CLIENT_PER_S: u64 = 4;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

fn avg(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_has_no_growth_trend_and_no_errors() {
    let secs: u64 = std::env::var("CHAT_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if secs == 0 {
        eprintln!("SKIPPED: soak test — set CHAT_SOAK_SECONDS (scripts/test.sh runs 60)");
        return;
    }
    assert!(
        secs >= 9,
        "a soak needs at least 9 s to have thirds to compare"
    );
    let backend = Backend::start().await;
    let gw = Gateway::start(&backend, "soak", &[]).await;
    let pid = gw.pid();

    // Everyone joins before anyone sends: each member must get every message of its room.
    let mut joined = vec![];
    for r in 0..ROOMS {
        let room = format!("soak-{r}");
        for i in 0..PER_ROOM {
            let mut c = Client::connect_addr(gw.addr, &format!("u{r}-{i}"), "/ws").await;
            c.join(&room).await;
            joined.push((c, room.clone()));
        }
    }
    let mut tasks = vec![];
    let mut receivers = vec![];
    for (mut c, room) in joined {
        receivers.push(room.clone());
        tasks.push(tokio::spawn(async move {
            let stop = tokio::time::Instant::now() + Duration::from_secs(secs);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / PER_CLIENT_PER_S));
            let mut acked = HashSet::new();
            while tokio::time::Instant::now() < stop {
                tick.tick().await;
                let a = c
                    .call(json!({"type": "message", "room": room, "content": "soak"}))
                    .await;
                assert_eq!(a["type"], "ack", "{}: {a}", c.user);
                acked.insert(a["id"].as_str().unwrap().to_string());
                // keep only what is counted at the end
                c.pending.retain(|f| f["type"] == "message");
            }
            (c, acked)
        }));
    }

    let mut rss = vec![];
    let mut depth = vec![];
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await; // the sampling period
        rss.push(rss_kib(pid) as f64);
        depth.push(metric(gw.addr, "chat_outbound_queue_depth_max").await);
    }

    let mut clients = vec![];
    let mut acked_by_room: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for (t, room) in tasks.into_iter().zip(receivers) {
        let (c, acked) = t.await.unwrap();
        acked_by_room.entry(room.clone()).or_default().extend(acked);
        clients.push((c, room));
    }
    for (c, room) in &mut clients {
        let want = &acked_by_room[room.as_str()];
        let mut seen = HashSet::new();
        for f in std::mem::take(&mut c.pending) {
            if f["type"] == "message" {
                assert!(seen.insert(f["id"].as_str().unwrap().to_string()));
            }
        }
        while !want.is_subset(&seen) {
            let Ok(f) = tokio::time::timeout(WAIT, c.recv_type("message")).await else {
                panic!(
                    "{} in {room}: {} of {} acked messages never arrived",
                    c.user,
                    want.difference(&seen).count(),
                    want.len()
                );
            };
            assert!(
                seen.insert(f["id"].as_str().unwrap().to_string()),
                "duplicate"
            );
        }
    }

    let third = rss.len() / 3;
    let (mid, last) = (&rss[third..2 * third], &rss[2 * third..]);
    let total: usize = acked_by_room.values().map(HashSet::len).sum();
    eprintln!(
        "soak: {secs} s, {total} messages; RSS KiB first {:.0} middle-third avg {:.0} last-third avg {:.0}; queue depth max {:?}",
        rss[0],
        avg(mid),
        avg(last),
        depth.iter().cloned().fold(0.0, f64::max)
    );
    assert!(
        avg(last) <= avg(mid) * 1.2,
        "RSS grows: middle third {:.0} KiB, last third {:.0} KiB ({rss:?})",
        avg(mid),
        avg(last)
    );
    let (dmid, dlast) = (&depth[third..2 * third], &depth[2 * third..]);
    assert!(avg(dlast) <= avg(dmid) + 8.0, "queues grow: {depth:?}");
    assert!(
        depth.iter().all(|&d| d < 512.0),
        "a queue came near its bound: {depth:?}"
    );
}
